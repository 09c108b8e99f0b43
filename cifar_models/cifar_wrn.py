"""Wide Residual Networks for CIFAR-sized inputs.

Paper: `Wide Residual Networks` - https://arxiv.org/abs/1605.07146

WRN-d-k has (d - 4) / 6 pre-activation basic blocks in each of three stages of widths 16k, 32k and
64k. Dropout (`drop_rate`) sits between the two 3x3 convs of a block, and the convs start from
Kaiming fan-in initialisation, as in the seed project `hysts/pytorch_image_classification`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_classifier
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from ._builder import PooledLinearHead, build_cifar_model, cifar_cfg, init_weights

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3 with a residual shortcut.

    When the width changes, the shortcut is a 1x1 conv that, like the residual branch, reads the
    pre-activated input; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
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
        if self.drop_rate > 0.0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        return y + self.shortcut(x)


class WideResNet(PooledLinearHead, nn.Module):
    """WRN-`depth`-`widen_factor`: stem conv, three stages of wide blocks, final BN-ReLU, pooled linear head."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        initial_channels: int = 16,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        init_mode: str = "kaiming_fan_in",
    ) -> None:
        """
        Args:
            depth: total number of weighted layers; must be 6n + 4.
            widen_factor: width multiplier k of the three stages.
            initial_channels: width of the stem conv and the base of the stage widths.
            drop_rate: dropout probability between the two convs of every block (0 disables it).
            num_classes: classifier outputs; 0 removes the classifier.
            in_chans: input image channels.
            global_pool: timm pooling type before the classifier; '' keeps the unpooled map.
            init_mode: conv weight initialisation, one of `_builder.INIT_MODES`.
        """
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        widths = [initial_channels * widen_factor * 2**i for i in range(3)]
        self.conv = nn.Conv2d(in_chans, initial_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.feature_info = [dict(num_chs=initial_channels, reduction=1, module="conv")]

        stages = []
        in_chs, reduction = initial_channels, 1
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = [
                WideBasicBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, drop_rate)
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

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        init_weights(self, init_mode)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^conv",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.(\d+)", None), (r"^norm", (99999,))],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
