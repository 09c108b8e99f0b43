"""Pre-activation ResNet and SE-ResNet for 32x32 inputs (three stages, BN-ReLU before each conv).

Papers:
- `Identity Mappings in Deep Residual Networks` - https://arxiv.org/abs/1603.05027 (pre-activation blocks;
  in the first block of a stage the shortcut may take the pre-activated input: `preact_stage`)
- `Deep Pyramidal Residual Networks` - https://arxiv.org/abs/1610.02915 (section 3 ablations: drop the first
  ReLU of each block, `remove_first_relu`; add a BN after the last conv, `add_last_bn`)
- `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507 (channel gating, `se_reduction`)

The basic-block variants reproduce the seed project `hysts/pytorch_image_classification` layer for layer.
The bottleneck variants (`resnet_preact164`, `resnet_preact1001`) follow the paper's widths instead of the
seed's: stage outputs 64 / 128 / 256 channels around bottlenecks of 16 / 32 / 64 (expansion 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, SEModule
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, conv_stem, init_weights
from .cifar_resnet import blocks_per_stage

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet"]


def _make_se(channels: int, se_reduction: int | None) -> nn.Module:
    """SE gate with `channels // se_reduction` hidden units (no rounding, as in the seed), or Identity."""
    if se_reduction is None:
        return nn.Identity()
    if se_reduction < 1 or channels // se_reduction < 1:
        raise ValueError(f"se_reduction must be None or an integer in [1, {channels}]; got {se_reduction}")
    return SEModule(channels, rd_channels=channels // se_reduction)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; optional last BN and SE gate on the residual branch; identity or 1x1 shortcut.

    With `preact=True` the shortcut also sees the pre-activated input (used for a stage's first block).
    """

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        preact: bool = False,
        remove_first_relu: bool = False,
        add_last_bn: bool = False,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.Identity() if remove_first_relu else nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs) if add_last_bn else nn.Identity()
        self.se = _make_se(out_chs, se_reduction)
        self.shortcut = nn.Sequential()
        if in_chs != out_chs:
            self.shortcut.add_module("conv", nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            x = F.relu(self.bn1(x), inplace=True)  # shortcut taken after the pre-activation
            y = self.conv1(x)
        else:
            y = self.conv1(self.act1(self.bn1(x)))  # pre-activation on the residual branch only
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.se(self.bn3(y))
        y += self.shortcut(x)
        return y


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 (expansion 4); switches as `PreActBasicBlock`."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        preact: bool = False,
        remove_first_relu: bool = False,
        add_last_bn: bool = False,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        mid_chs = out_chs // self.expansion
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.Identity() if remove_first_relu else nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, kernel_size=1, bias=False)
        self.bn4 = nn.BatchNorm2d(out_chs) if add_last_bn else nn.Identity()
        self.se = _make_se(out_chs, se_reduction)
        self.shortcut = nn.Sequential()
        if in_chs != out_chs:
            self.shortcut.add_module("conv", nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            x = F.relu(self.bn1(x), inplace=True)  # shortcut taken after the pre-activation
            y = self.conv1(x)
        else:
            y = self.conv1(self.act1(self.bn1(x)))  # pre-activation on the residual branch only
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.conv3(F.relu(self.bn3(y), inplace=True))
        y = self.se(self.bn4(y))
        y += self.shortcut(x)
        return y


class PreActResNet(CifarNet):
    """CIFAR pre-activation ResNet: 3x3 stem conv, three stages, final BN-ReLU, global average pool, linear.

    Setting `se_reduction` turns it into the SE-ResNet-preact of the seed (an SE gate in every block).
    """

    def __init__(
        self,
        depth: int = 110,
        block_type: str = "basic",
        initial_channels: int = 16,
        preact_stage: Sequence[bool] = (True, True, True),
        remove_first_relu: bool = False,
        add_last_bn: bool = False,
        se_reduction: int | None = None,
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
            preact_stage: Per stage, whether its first block's shortcut takes the pre-activated input.
            remove_first_relu: Drop the ReLU before each block's first conv (where `preact` is off).
            add_last_bn: Add a BN after each block's last conv.
            se_reduction: SE hidden width = channels // this; None for no SE gate.
            drop_rate: Dropout before the classifier (not in the seed; 0 reproduces it).
            init_mode: Conv weight init, one of `cifar_models._builder.INIT_MODES`.
        """
        super().__init__()
        n_blocks = blocks_per_stage(depth, block_type)
        preact_stage = tuple(preact_stage)
        if len(preact_stage) != 3 or not all(isinstance(p, bool) for p in preact_stage):
            raise ValueError(f"preact_stage must be three booleans, one per stage; got {preact_stage!r}")
        block = PreActBasicBlock if block_type == "basic" else PreActBottleneck

        self.stem = conv_stem(in_chans, initial_channels)
        self.feature_info = [dict(num_chs=initial_channels, reduction=1, module="stem.conv")]

        in_chs, reduction, stages = initial_channels, 1, []
        for stage_idx, width in enumerate((1, 2, 4)):
            out_chs = initial_channels * width * block.expansion
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = [
                block(
                    in_chs if i == 0 else out_chs,
                    out_chs,
                    stride=stride if i == 0 else 1,
                    preact=preact_stage[stage_idx] if i == 0 else False,
                    remove_first_relu=remove_first_relu,
                    add_last_bn=add_last_bn,
                    se_reduction=se_reduction,
                )
                for i in range(n_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            # the last stage is tapped after the final BN-ReLU, which is what the head sees
            module = f"stages.{stage_idx}" if stage_idx < 2 else "norm"
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=module))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = BatchNormAct2d(in_chs, act_layer=nn.ReLU)

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)


def _create_resnet_preact(variant: str, pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    return build_cifar_model(PreActResNet, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "resnet_preact20": cifar_cfg(),
        "resnet_preact32": cifar_cfg(),
        "resnet_preact44": cifar_cfg(),
        "resnet_preact50": cifar_cfg(),
        "resnet_preact56": cifar_cfg(),
        "resnet_preact110": cifar_cfg(),
        "resnet_preact164": cifar_cfg(),
        "resnet_preact1001": cifar_cfg(),
        "se_resnet_preact110": cifar_cfg(),
    }
)


@register_model
def resnet_preact20(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=20, block_type="basic")
    return _create_resnet_preact("resnet_preact20", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_preact32(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=32, block_type="basic")
    return _create_resnet_preact("resnet_preact32", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_preact44(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=44, block_type="basic")
    return _create_resnet_preact("resnet_preact44", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_preact50(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=50, block_type="basic")
    return _create_resnet_preact("resnet_preact50", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_preact56(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=56, block_type="basic")
    return _create_resnet_preact("resnet_preact56", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_preact110(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=110, block_type="basic")
    return _create_resnet_preact("resnet_preact110", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_preact164(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=164, block_type="bottleneck")
    return _create_resnet_preact("resnet_preact164", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_preact1001(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(depth=1001, block_type="bottleneck")
    return _create_resnet_preact("resnet_preact1001", pretrained, **dict(model_args, **kwargs))


@register_model
def se_resnet_preact110(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    model_args = dict(
        depth=110, se_reduction=16, remove_first_relu=True, add_last_bn=True, preact_stage=(True, False, False)
    )
    return _create_resnet_preact("se_resnet_preact110", pretrained, **dict(model_args, **kwargs))
