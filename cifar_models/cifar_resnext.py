"""ResNeXt-29 for CIFAR (3 stages of grouped-convolution bottleneck blocks).

Paper: `Aggregated Residual Transformations for Deep Neural Networks` - https://arxiv.org/abs/1611.05431

The CIFAR variant of the paper's section 5.3: a 3x3 stem with 64 channels, three stages of
(depth - 2) / 9 bottleneck blocks, output widths 256 / 512 / 1024, and a grouped 3x3 convolution
of `cardinality` groups, each `base_channels * 2**stage` wide. Same layers, order and initialisation
as `models/cifar/resnext.py` of hysts/pytorch_image_classification.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, conv_stem, init_weights

__all__ = ["ResNeXt", "ResNeXtBottleneck"]


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce -> grouped 3x3 (carries the stride) -> 1x1 expand, plus a projection shortcut when the shape changes.

    ReLU follows the addition (post-activation, as in the original ResNet).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        bottleneck_chs: int = 256,
        cardinality: int = 8,
    ) -> None:
        super().__init__()
        if bottleneck_chs % cardinality:
            raise ValueError(f"bottleneck width {bottleneck_chs} is not divisible by cardinality {cardinality}")
        self.conv1 = nn.Conv2d(in_chs, bottleneck_chs, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bottleneck_chs, bottleneck_chs, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn2 = nn.BatchNorm2d(bottleneck_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(bottleneck_chs, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        if in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        else:
            self.shortcut = nn.Identity()
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


class ResNeXt(CifarNet):
    """ResNeXt for 32x32 inputs: stem conv-BN-ReLU, three bottleneck stages (strides 1, 2, 2), global pool, linear."""

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 8,
        base_channels: int = 64,
        initial_channels: int = 64,
        expansion: int = 4,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init_mode: str = "kaiming_fan_out",
    ) -> None:
        """
        Args:
            depth: 9 * blocks_per_stage + 2 (29 -> 3 blocks per stage).
            cardinality: number of groups of the 3x3 convolution.
            base_channels: width of one group in the first stage; doubles each stage.
            initial_channels: stem width; stage output widths are initial_channels * expansion * (1, 2, 4).
            expansion: stage output width over stem width.
            drop_rate: dropout before the classifier (0 in the seed).
            init_mode: one of `cifar_models._builder.INIT_MODES`.
        """
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"ResNeXt depth must be 9 * n + 2 with n >= 1 (29, 38, ...); got {depth}")
        blocks_per_stage = (depth - 2) // 9

        self.stem = conv_stem(in_chans, initial_channels, norm=True, act=True)
        self.feature_info = [dict(num_chs=initial_channels, reduction=1, module="stem.act")]

        stages = []
        in_chs = initial_channels
        for stage_idx in range(3):
            out_chs = initial_channels * expansion * 2**stage_idx
            stride = 1 if stage_idx == 0 else 2
            bottleneck_chs = cardinality * base_channels * 2**stage_idx
            blocks = []
            for block_idx in range(blocks_per_stage):
                blocks.append(
                    ResNeXtBottleneck(
                        in_chs,
                        out_chs,
                        stride=stride if block_idx == 0 else 1,
                        bottleneck_chs=bottleneck_chs,
                        cardinality=cardinality,
                    )
                )
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=2**stage_idx, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()  # post-activation blocks end in a ReLU already

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)


def _create_resnext(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNeXt:
    return build_cifar_model(ResNeXt, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "resnext29_4x64d": cifar_cfg(),
        "resnext29_8x64d": cifar_cfg(),
        "resnext29_16x64d": cifar_cfg(),
    }
)


@register_model
def resnext29_4x64d(pretrained: bool = False, **kwargs: Any) -> ResNeXt:
    """ResNeXt-29, 4 groups of 64 channels (17.6M parameters)."""
    model_args = dict(depth=29, cardinality=4, base_channels=64)
    return _create_resnext("resnext29_4x64d", pretrained, **dict(model_args, **kwargs))


@register_model
def resnext29_8x64d(pretrained: bool = False, **kwargs: Any) -> ResNeXt:
    """ResNeXt-29, 8 groups of 64 channels (34.4M parameters; the paper's CIFAR model)."""
    model_args = dict(depth=29, cardinality=8, base_channels=64)
    return _create_resnext("resnext29_8x64d", pretrained, **dict(model_args, **kwargs))


@register_model
def resnext29_16x64d(pretrained: bool = False, **kwargs: Any) -> ResNeXt:
    """ResNeXt-29, 16 groups of 64 channels (68.2M parameters)."""
    model_args = dict(depth=29, cardinality=16, base_channels=64)
    return _create_resnext("resnext29_16x64d", pretrained, **dict(model_args, **kwargs))
