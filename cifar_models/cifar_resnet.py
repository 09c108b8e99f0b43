"""ResNet for 32x32 inputs (the CIFAR variant: three stages of 16 / 32 / 64 channels).

Paper: `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
(section 4.2 describes the CIFAR-10 networks: depth 6n + 2, basic blocks, global average pooling).

The basic-block variants reproduce the seed project `hysts/pytorch_image_classification` layer for layer.
The bottleneck variant (`resnet164`, depth 9n + 2) follows the paper's widths instead of the seed's: the
stages output 64 / 128 / 256 channels around bottlenecks of 16 / 32 / 64 (expansion 4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, conv_stem, init_weights

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]

BLOCK_TYPES = ("basic", "bottleneck")


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, ReLU after the residual addition; projection shortcut (1x1 conv + BN) on change."""

    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Sequential()
        if in_chs != out_chs:
            self.shortcut.add_module("conv", nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False))
            self.shortcut.add_module("bn", nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        y += self.shortcut(x)
        return F.relu(y, inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, each with BN; ReLU after the residual addition."""

    expansion = 4

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        mid_chs = out_chs // self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid_chs, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Sequential()
        if in_chs != out_chs:
            self.shortcut.add_module("conv", nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False))
            self.shortcut.add_module("bn", nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        y += self.shortcut(x)
        return F.relu(y, inplace=True)


def blocks_per_stage(depth: int, block_type: str) -> int:
    """Blocks in each of the three stages: depth = 6n + 2 (basic) or 9n + 2 (bottleneck)."""
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"block_type must be one of {', '.join(BLOCK_TYPES)}; got {block_type!r}")
    layers_per_block = 2 if block_type == "basic" else 3
    n, rest = divmod(depth - 2, 3 * layers_per_block)
    if n < 1 or rest:
        rule = "6n + 2 (20, 32, 44, 56, 110, ...)" if block_type == "basic" else "9n + 2 (29, 47, 164, ...)"
        raise ValueError(f"depth for {block_type!r} blocks must be {rule}; got {depth}")
    return n


class ResNet(CifarNet):
    """CIFAR ResNet: 3x3 stem (conv-BN-ReLU), three stages at strides 1 / 2 / 2, global average pool, linear."""

    def __init__(
        self,
        depth: int = 110,
        block_type: str = "basic",
        initial_channels: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init_mode: str = "kaiming_fan_out",
    ) -> None:
        """
        Args:
            depth: Total number of weighted layers, 6n + 2 for basic blocks, 9n + 2 for bottlenecks.
            block_type: 'basic' (two 3x3 convs) or 'bottleneck' (1x1-3x3-1x1, expansion 4).
            initial_channels: Stem width; stage outputs are (1, 2, 4) x this x block expansion.
            drop_rate: Dropout before the classifier (not in the seed; 0 reproduces it).
            init_mode: Conv weight init, one of `cifar_models._builder.INIT_MODES`.
        """
        super().__init__()
        n_blocks = blocks_per_stage(depth, block_type)
        block = BasicBlock if block_type == "basic" else Bottleneck

        self.stem = conv_stem(in_chans, initial_channels, norm=True, act=True)
        self.feature_info = [dict(num_chs=initial_channels, reduction=1, module="stem.act")]

        in_chs, reduction, stages = initial_channels, 1, []
        for stage_idx, width in enumerate((1, 2, 4)):
            out_chs = initial_channels * width * block.expansion
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = [block(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1) for i in range(n_blocks)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()  # post-activation blocks end in a ReLU already

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    return build_cifar_model(ResNet, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "resnet20": cifar_cfg(),
        "resnet32": cifar_cfg(),
        "resnet44": cifar_cfg(),
        "resnet56": cifar_cfg(),
        "resnet110": cifar_cfg(),
        "resnet1202": cifar_cfg(),
        "resnet164": cifar_cfg(),
    }
)


@register_model
def resnet20(pretrained: bool = False, **kwargs: Any) -> ResNet:
    model_args = dict(depth=20, block_type="basic")
    return _create_resnet("resnet20", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet32(pretrained: bool = False, **kwargs: Any) -> ResNet:
    model_args = dict(depth=32, block_type="basic")
    return _create_resnet("resnet32", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet44(pretrained: bool = False, **kwargs: Any) -> ResNet:
    model_args = dict(depth=44, block_type="basic")
    return _create_resnet("resnet44", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet56(pretrained: bool = False, **kwargs: Any) -> ResNet:
    model_args = dict(depth=56, block_type="basic")
    return _create_resnet("resnet56", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet110(pretrained: bool = False, **kwargs: Any) -> ResNet:
    model_args = dict(depth=110, block_type="basic")
    return _create_resnet("resnet110", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet1202(pretrained: bool = False, **kwargs: Any) -> ResNet:
    model_args = dict(depth=1202, block_type="basic")
    return _create_resnet("resnet1202", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet164(pretrained: bool = False, **kwargs: Any) -> ResNet:
    model_args = dict(depth=164, block_type="bottleneck")
    return _create_resnet("resnet164", pretrained, **dict(model_args, **kwargs))
