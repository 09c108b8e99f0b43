"""VGG-like network with batch norm for 32x32 inputs (13 3x3 convs in five pooled stages, one linear).

Papers:
- `Very Deep Convolutional Networks for Large-Scale Image Recognition` - https://arxiv.org/abs/1409.1556
- `Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift`
  - https://arxiv.org/abs/1502.03167

Reproduces the seed project `hysts/pytorch_image_classification` (convs keep their bias, no hidden FC
layers) at 32x32. Two deliberate differences that only matter off 32x32: max pooling rounds up
(`ceil_mode`), so 28x28 MNIST-style inputs reach 1x1 instead of 0x0, and the classifier reads a global
average pool instead of a flatten, so any input size works (at 32x32 the map is 1x1 and both agree).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, init_weights

__all__ = ["VGG"]


def _conv_unit(in_chs: int, out_chs: int, use_bn: bool) -> nn.Sequential:
    """conv3x3 (with bias, as the seed) [-BN] -ReLU: one block of a stage, one gradient-checkpointing segment."""
    unit = nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1)))
    if use_bn:
        unit.add_module("bn", nn.BatchNorm2d(out_chs))
    unit.add_module("act", nn.ReLU(inplace=True))
    return unit


def _make_stage(in_chs: int, out_chs: int, n_layers: int, use_bn: bool) -> nn.Sequential:
    """`n_layers` conv units, then a 2x2 max pool (stride 2)."""
    units = [_conv_unit(in_chs if i == 0 else out_chs, out_chs, use_bn) for i in range(n_layers)]
    return nn.Sequential(*units, nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))


class VGG(CifarNet):
    """Five conv stages, each halving the resolution, then global pool and one linear classifier."""

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        layers: Sequence[int] = (2, 2, 3, 3, 3),
        use_bn: bool = True,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init_mode: str = "kaiming_fan_out",
    ) -> None:
        """
        Args:
            channels: Output channels of each stage.
            layers: Number of 3x3 convs in each stage (same length as `channels`).
            use_bn: BN after every conv.
            drop_rate: Dropout before the classifier (not in the seed; 0 reproduces it).
            init_mode: Conv weight init, one of `cifar_models._builder.INIT_MODES`.
        """
        super().__init__()
        channels, layers = tuple(channels), tuple(layers)
        if not channels or len(channels) != len(layers) or min(layers) < 1 or min(channels) < 1:
            raise ValueError(
                f"channels and layers must be equally long, non-empty and positive; got {channels} and {layers}"
            )
        self.stem = nn.Identity()  # the first conv belongs to stage 0, as in the seed; the stem is no feature level

        in_chs, stages, self.feature_info = in_chans, [], []
        for stage_idx, (out_chs, n_layers) in enumerate(zip(channels, layers)):
            stages.append(_make_stage(in_chs, out_chs, n_layers, use_bn))
            reduction = 2 ** (stage_idx + 1)  # each stage ends in a stride-2 max pool
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"  # fine: a group per conv unit
        return dict(stem=r"^stages\.0\.0\.", blocks=blocks)  # no stem: the first conv unit stands in for it


def _create_vgg(variant: str, pretrained: bool = False, **kwargs: Any) -> VGG:
    n_stages = len(kwargs.get("layers", (2, 2, 3, 3, 3)))
    return build_cifar_model(VGG, variant, pretrained, feature_levels=n_stages, **kwargs)


default_cfgs = generate_default_cfgs({"vgg15_bn": cifar_cfg(first_conv="stages.0.0.conv", pool_size=(1, 1))})


@register_model
def vgg15_bn(pretrained: bool = False, **kwargs: Any) -> VGG:
    model_args = dict(channels=(64, 128, 256, 512, 512), layers=(2, 2, 3, 3, 3), use_bn=True)
    return _create_vgg("vgg15_bn", pretrained, **dict(model_args, **kwargs))
