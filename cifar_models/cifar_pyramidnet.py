"""PyramidNet for CIFAR-sized inputs.

Paper: `Deep Pyramidal Residual Networks` - https://arxiv.org/abs/1610.02915

Instead of doubling the width at each downsampling, every block widens the network by
`alpha / N` channels (N blocks in all), rounded per block. The shortcut is the identity (2x2
average pooling where the block downsamples) padded with zero channels up to the block's width,
so no shortcut has parameters. Blocks are BN-conv-BN-ReLU-conv-BN (basic) or the 1x1-3x3-1x1
bottleneck with 4x expansion, with no ReLU before the first conv, as in the seed project
`hysts/pytorch_image_classification`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, conv_stem, init_weights

__all__ = ["PyramidBasicBlock", "PyramidBottleneckBlock", "PyramidNet", "pyramidnet_widths"]

BLOCK_TYPES = ("basic", "bottleneck")


class PyramidBasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN plus a zero-padded, parameter-free shortcut."""

    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.pad_chs = out_chs - in_chs  # zero channels appended to the shortcut
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.AvgPool2d(kernel_size=2, stride=2) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.bn3(y)
        shortcut = self.shortcut(x)
        if self.pad_chs > 0:
            shortcut = F.pad(shortcut, [0, 0, 0, 0, 0, self.pad_chs])
        return y + shortcut


class PyramidBottleneckBlock(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN plus a zero-padded, parameter-free shortcut.

    `out_chs` is the block's output width; the inner width is `out_chs // 4`.
    """

    expansion = 4

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.pad_chs = out_chs - in_chs  # zero channels appended to the shortcut
        mid_chs = out_chs // self.expansion
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, kernel_size=1, stride=1, bias=False)
        self.bn4 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.AvgPool2d(kernel_size=2, stride=2) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.conv3(F.relu(self.bn3(y), inplace=True))
        y = self.bn4(y)
        shortcut = self.shortcut(x)
        if self.pad_chs > 0:
            shortcut = F.pad(shortcut, [0, 0, 0, 0, 0, self.pad_chs])
        return y + shortcut


def pyramidnet_widths(depth: int, alpha: float, initial_channels: int = 16, block_type: str = "basic") -> list[int]:
    """Stem width followed by the output width of every block, in order.

    The unexpanded width grows by `alpha / N` per block (N = number of blocks) and is rounded
    half-to-even per block; bottleneck blocks multiply it by their expansion of 4.
    """
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"PyramidNet block_type must be one of {', '.join(BLOCK_TYPES)}; got {block_type!r}")
    layers_per_block = 2 if block_type == "basic" else 3
    step = 3 * layers_per_block  # weighted layers added per extra block in each of the three stages
    if depth < 2 + step or (depth - 2) % step != 0:
        raise ValueError(f"PyramidNet depth for block_type {block_type!r} must be {step}n + 2 with n >= 1; got {depth}")
    if alpha < 0:
        raise ValueError(f"PyramidNet alpha (total widening) must be >= 0; got {alpha}")
    expansion = 1 if block_type == "basic" else PyramidBottleneckBlock.expansion
    num_blocks = 3 * ((depth - 2) // step)
    widths = [float(initial_channels)]
    for _ in range(num_blocks):
        widths.append(widths[-1] + alpha / num_blocks)
    return [initial_channels] + [round(w) * expansion for w in widths[1:]]


class PyramidNet(CifarNet):
    """PyramidNet for 32x32 inputs: conv-BN stem, three pyramidal stages, final BN-ReLU, pooled linear head."""

    def __init__(
        self,
        depth: int = 272,
        alpha: float = 200,
        block_type: str = "bottleneck",
        initial_channels: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init_mode: str = "kaiming_fan_out",
    ) -> None:
        """
        Args:
            depth: number of weighted layers; 6n + 2 for 'basic', 9n + 2 for 'bottleneck'.
            alpha: total widening over all blocks (before the bottleneck expansion).
            block_type: 'basic' (two conv3x3) or 'bottleneck' (conv1x1-conv3x3-conv1x1, 4x expansion).
            initial_channels: width of the stem conv and start of the widening.
            num_classes: classifier outputs; 0 removes the classifier.
            in_chans: input image channels.
            global_pool: timm pooling type before the classifier; '' keeps the unpooled map.
            drop_rate: dropout before the classifier (not in the paper or the seed; 0 reproduces them).
            init_mode: conv weight initialisation, one of `_builder.INIT_MODES`.
        """
        super().__init__()
        widths = pyramidnet_widths(depth, alpha, initial_channels, block_type)
        block_cls = PyramidBasicBlock if block_type == "basic" else PyramidBottleneckBlock
        blocks_per_stage = (len(widths) - 1) // 3

        self.stem = conv_stem(in_chans, initial_channels, norm=True)
        self.feature_info = [dict(num_chs=initial_channels, reduction=1, module="stem.bn")]

        stages = []
        reduction = 1
        for stage_idx in range(3):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            first = stage_idx * blocks_per_stage
            blocks = [
                block_cls(widths[first + i], widths[first + i + 1], stride if i == 0 else 1)
                for i in range(blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            if stage_idx < 2:
                out_chs = widths[first + blocks_per_stage]
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        # The last stage is reported after the final BN-ReLU, which makes it a usable feature map.
        self.norm = BatchNormAct2d(widths[-1])
        self.feature_info.append(dict(num_chs=widths[-1], reduction=reduction, module="norm"))

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)


def _create_pyramidnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    return build_cifar_model(PyramidNet, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "pyramidnet110_84": cifar_cfg(),
        "pyramidnet110_270": cifar_cfg(),
        "pyramidnet164_270": cifar_cfg(),
        "pyramidnet272_200": cifar_cfg(),
    }
)


@register_model
def pyramidnet110_84(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PyramidNet-110, alpha=84, basic blocks (3.9M params)."""
    model_args = dict(depth=110, alpha=84, block_type="basic")
    return _create_pyramidnet("pyramidnet110_84", pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet110_270(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PyramidNet-110, alpha=270, basic blocks (28.5M params)."""
    model_args = dict(depth=110, alpha=270, block_type="basic")
    return _create_pyramidnet("pyramidnet110_270", pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet164_270(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PyramidNet-164, alpha=270, bottleneck blocks (27.2M params)."""
    model_args = dict(depth=164, alpha=270, block_type="bottleneck")
    return _create_pyramidnet("pyramidnet164_270", pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet272_200(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PyramidNet-272, alpha=200, bottleneck blocks (26.2M params)."""
    model_args = dict(depth=272, alpha=200, block_type="bottleneck")
    return _create_pyramidnet("pyramidnet272_200", pretrained, **dict(model_args, **kwargs))
