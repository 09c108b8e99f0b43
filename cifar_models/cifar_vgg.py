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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from ._builder import build_cifar_model, cifar_cfg, init_weights

__all__ = ["VGG"]


def _make_stage(in_chs: int, out_chs: int, n_layers: int, use_bn: bool) -> nn.Sequential:
    """`n_layers` x (conv3x3 [-BN] -ReLU), then a 2x2 max pool (stride 2)."""
    stage = nn.Sequential()
    for i in range(n_layers):
        stage.add_module(f"conv{i}", nn.Conv2d(in_chs if i == 0 else out_chs, out_chs, kernel_size=3, padding=1))
        if use_bn:
            stage.add_module(f"bn{i}", nn.BatchNorm2d(out_chs))
        stage.add_module(f"act{i}", nn.ReLU(inplace=True))
    stage.add_module("pool", nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
    return stage


class VGG(nn.Module):
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
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        in_chs, stages, self.feature_info = in_chans, [], []
        for stage_idx, (out_chs, n_layers) in enumerate(zip(channels, layers)):
            stages.append(_make_stage(in_chs, out_chs, n_layers, use_bn))
            reduction = 2 ** (stage_idx + 1)  # each stage ends in a stride-2 max pool
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        init_weights(self, init_mode)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.\D+(\d+)"  # fine: a group per conv and its BN
        return dict(stem=r"^stages\.0\.(?:conv|bn)0\.", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_vgg(variant: str, pretrained: bool = False, **kwargs: Any) -> VGG:
    n_stages = len(kwargs.get("layers", (2, 2, 3, 3, 3)))
    return build_cifar_model(VGG, variant, pretrained, feature_levels=n_stages, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return cifar_cfg(first_conv="stages.0.conv0", classifier="head.fc", pool_size=(1, 1), **kwargs)


default_cfgs = generate_default_cfgs({"vgg15_bn": _cfg()})


@register_model
def vgg15_bn(pretrained: bool = False, **kwargs: Any) -> VGG:
    model_args = dict(channels=(64, 128, 256, 512, 512), layers=(2, 2, 3, 3, 3), use_bn=True)
    return _create_vgg("vgg15_bn", pretrained, **dict(model_args, **kwargs))
