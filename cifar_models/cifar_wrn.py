"""Wide Residual Networks for CIFAR-sized inputs.

Paper: `Wide Residual Networks` - https://arxiv.org/abs/1605.07146

WRN-d-k has (d - 4) / 6 pre-activation basic blocks in each of three stages of widths 16k, 32k and
64k. Dropout (`proj_drop_rate`, the paper's 0.3 when on) sits between the two 3x3 convs of a block, and
the convs start from Kaiming fan-in initialisation, as in the seed project `hysts/pytorch_image_classification`.
`drop_rate` is timm's dropout before the classifier (not in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, conv_stem, init_weights

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3 with a residual shortcut.

    When the width changes, the shortcut is a 1x1 conv that, like the residual branch, reads the
    pre-activated input; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.proj_drop_rate = proj_drop_rate
        self.preact_shortcut = in_chs != out_chs
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        if in_chs != out_chs:
            self.shortcut: nn.Module = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(x))
        if self.preact_shortcut:
            x = y
        y = self.conv1(y)
        if self.proj_drop_rate > 0.0:
            y = F.dropout(y, p=self.proj_drop_rate, training=self.training)
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        return y + self.shortcut(x)


class WideResNet(CifarNet):
    """WRN-`depth`-`widen_factor`: stem conv, three stages of wide blocks, final BN-ReLU, pooled linear head."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        initial_channels: int = 16,
        proj_drop_rate: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init_mode: str = "kaiming_fan_in",
    ) -> None:
        """
        Args:
            depth: total number of weighted layers; must be 6n + 4.
            widen_factor: width multiplier k of the three stages.
            initial_channels: width of the stem conv and the base of the stage widths.
            proj_drop_rate: dropout probability between the two convs of every block (0 disables it).
            num_classes: classifier outputs; 0 removes the classifier.
            in_chans: input image channels.
            global_pool: timm pooling type before the classifier; '' keeps the unpooled map.
            drop_rate: dropout before the classifier (not in the paper or the seed; 0 reproduces them).
            init_mode: conv weight initialisation, one of `_builder.INIT_MODES`.
        """
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth}")
        blocks_per_stage = (depth - 4) // 6

        widths = [initial_channels * widen_factor * 2**i for i in range(3)]
        self.stem = conv_stem(in_chans, initial_channels)
        self.feature_info = [dict(num_chs=initial_channels, reduction=1, module="stem.conv")]

        stages = []
        in_chs, reduction = initial_channels, 1
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = [
                WideBasicBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, proj_drop_rate)
                for i in range(blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
            if stage_idx < 2:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        # The last stage is reported after the final BN-ReLU, which makes it a usable feature map.
        self.norm = BatchNormAct2d(in_chs)
        self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module="norm"))

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)


def _create_wrn(variant: str, pretrained: bool = False, **kwargs: Any) -> WideResNet:
    return build_cifar_model(WideResNet, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "wrn16_4": cifar_cfg(),
        "wrn16_8": cifar_cfg(),
        "wrn28_10": cifar_cfg(),
        "wrn40_4": cifar_cfg(),
    }
)


@register_model
def wrn16_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-4 (2.7M params)."""
    model_args = dict(depth=16, widen_factor=4)
    return _create_wrn("wrn16_4", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_8(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-8 (11.0M params)."""
    model_args = dict(depth=16, widen_factor=8)
    return _create_wrn("wrn16_8", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10 (36.5M params)."""
    model_args = dict(depth=28, widen_factor=10)
    return _create_wrn("wrn28_10", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn40_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-4 (8.9M params)."""
    model_args = dict(depth=40, widen_factor=4)
    return _create_wrn("wrn40_4", pretrained, **dict(model_args, **kwargs))
