"""DenseNet and DenseNet-BC for CIFAR-sized inputs.

Paper: `Densely Connected Convolutional Networks` - https://arxiv.org/abs/1608.06993

Three dense stages joined by transitions (BN-ReLU-conv1x1-avgpool). Every layer appends
`growth_rate` channels to its input. The basic variant uses one BN-ReLU-conv3x3 per layer and no
compression; DenseNet-BC uses a 1x1 bottleneck of 4 * `growth_rate` channels and transitions that
keep `compression_rate` of the channels. The stem conv has 2 * `growth_rate` channels in both, as
in the seed project `hysts/pytorch_image_classification`. Dropout after every conv of the dense layers and
transitions (the paper's 0.2 without data augmentation) is `proj_drop_rate`, timm's DenseNet name for it;
`drop_rate` is dropout before the classifier (not in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, conv_stem, init_weights

__all__ = ["DenseBasicLayer", "DenseBottleneckLayer", "DenseNet", "DenseTransition", "densenet_stage_channels"]

BLOCK_TYPES = ("basic", "bottleneck")


class DenseBasicLayer(nn.Module):
    """BN-ReLU-conv3x3 producing `growth_rate` new channels, concatenated to the input."""

    def __init__(self, in_chs: int, growth_rate: int, proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.proj_drop_rate = proj_drop_rate
        self.bn = nn.BatchNorm2d(in_chs)
        self.conv = nn.Conv2d(in_chs, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.relu(self.bn(x)))
        if self.proj_drop_rate > 0.0:
            y = F.dropout(y, p=self.proj_drop_rate, training=self.training)
        return torch.cat([x, y], dim=1)


class DenseBottleneckLayer(nn.Module):
    """BN-ReLU-conv1x1 to 4 * `growth_rate`, then BN-ReLU-conv3x3 to `growth_rate`, concatenated to the input."""

    def __init__(self, in_chs: int, growth_rate: int, proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.proj_drop_rate = proj_drop_rate
        bottleneck_chs = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, bottleneck_chs, kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck_chs)
        self.conv2 = nn.Conv2d(bottleneck_chs, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        if self.proj_drop_rate > 0.0:
            y = F.dropout(y, p=self.proj_drop_rate, training=self.training)
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        if self.proj_drop_rate > 0.0:
            y = F.dropout(y, p=self.proj_drop_rate, training=self.training)
        return torch.cat([x, y], dim=1)


class DenseTransition(nn.Module):
    """BN-ReLU-conv1x1 (channel compression) then 2x2 average pooling (halves the resolution)."""

    def __init__(self, in_chs: int, out_chs: int, proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.proj_drop_rate = proj_drop_rate
        self.bn = nn.BatchNorm2d(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.relu(self.bn(x)))
        if self.proj_drop_rate > 0.0:
            x = F.dropout(x, p=self.proj_drop_rate, training=self.training)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


def densenet_stage_channels(
    depth: int, growth_rate: int, block_type: str = "bottleneck", compression_rate: float = 0.5
) -> list[tuple[int, int]]:
    """(input, output) channels of each of the three dense stages, transitions included.

    Stage i > 0 starts with the transition that compresses the previous stage's output to
    `int(channels * compression_rate)`; each dense layer then adds `growth_rate` channels.
    """
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"DenseNet block_type must be one of {', '.join(BLOCK_TYPES)}; got {block_type!r}")
    layers_per_depth = 3 if block_type == "basic" else 6  # weighted layers per dense layer x 3 stages
    if depth < 4 + layers_per_depth or (depth - 4) % layers_per_depth != 0:
        raise ValueError(
            f"DenseNet depth for block_type {block_type!r} must be {layers_per_depth}n + 4 with n >= 1; got {depth}"
        )
    if not 0.0 < compression_rate <= 1.0:
        raise ValueError(f"DenseNet compression_rate must be in (0, 1]; got {compression_rate}")
    layers_per_stage = (depth - 4) // layers_per_depth
    channels = []
    in_chs = 2 * growth_rate
    for stage_idx in range(3):
        if stage_idx > 0:
            in_chs = int(in_chs * compression_rate)
        out_chs = in_chs + layers_per_stage * growth_rate
        channels.append((in_chs, out_chs))
        in_chs = out_chs
    return channels


class DenseNet(CifarNet):
    """DenseNet(-BC) for 32x32 inputs: stem conv, three dense stages, final BN-ReLU, pooled linear head."""

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        block_type: str = "bottleneck",
        compression_rate: float = 0.5,
        proj_drop_rate: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init_mode: str = "kaiming_fan_out",
    ) -> None:
        """
        Args:
            depth: number of weighted layers; 3n + 4 for 'basic', 6n + 4 for 'bottleneck'.
            growth_rate: channels added by every dense layer (k).
            block_type: 'basic' (conv3x3) or 'bottleneck' (conv1x1 to 4k, then conv3x3).
            compression_rate: fraction of channels a transition keeps (1.0 = no compression).
            proj_drop_rate: dropout probability after every conv of the dense layers and transitions.
            num_classes: classifier outputs; 0 removes the classifier.
            in_chans: input image channels.
            global_pool: timm pooling type before the classifier; '' keeps the unpooled map.
            drop_rate: dropout before the classifier (not in the paper or the seed; 0 reproduces them).
            init_mode: conv weight initialisation, one of `_builder.INIT_MODES`.
        """
        super().__init__()
        stage_chs = densenet_stage_channels(depth, growth_rate, block_type, compression_rate)
        layer_cls = DenseBasicLayer if block_type == "basic" else DenseBottleneckLayer
        layers_per_stage = (stage_chs[0][1] - stage_chs[0][0]) // growth_rate

        self.stem = conv_stem(in_chans, stage_chs[0][0])
        self.feature_info = [dict(num_chs=stage_chs[0][0], reduction=1, module="stem.conv")]

        stages = []
        prev_chs, reduction = stage_chs[0][0], 1
        for stage_idx, (in_chs, out_chs) in enumerate(stage_chs):
            layers: list[nn.Module] = []
            if stage_idx > 0:
                layers.append(DenseTransition(prev_chs, in_chs, proj_drop_rate))
                reduction *= 2
            layers += [
                layer_cls(in_chs + i * growth_rate, growth_rate, proj_drop_rate) for i in range(layers_per_stage)
            ]
            stages.append(nn.Sequential(*layers))
            prev_chs = out_chs
            if stage_idx < 2:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        # The last stage is reported after the final BN-ReLU, which makes it a usable feature map.
        self.norm = BatchNormAct2d(prev_chs)
        self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module="norm"))

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)


def _create_densenet(variant: str, pretrained: bool = False, **kwargs: Any) -> DenseNet:
    return build_cifar_model(DenseNet, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "densenet40_k12": cifar_cfg(),
        "densenet100_k12": cifar_cfg(),
        "densenet100_k24": cifar_cfg(),
        "densenet_bc100_k12": cifar_cfg(),
        "densenet_bc250_k24": cifar_cfg(),
        "densenet_bc190_k40": cifar_cfg(),
    }
)


@register_model
def densenet40_k12(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-40, k=12, basic layers, no compression (1.1M params)."""
    model_args = dict(depth=40, growth_rate=12, block_type="basic", compression_rate=1.0)
    return _create_densenet("densenet40_k12", pretrained, **dict(model_args, **kwargs))


@register_model
def densenet100_k12(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-100, k=12, basic layers, no compression (7.1M params)."""
    model_args = dict(depth=100, growth_rate=12, block_type="basic", compression_rate=1.0)
    return _create_densenet("densenet100_k12", pretrained, **dict(model_args, **kwargs))


@register_model
def densenet100_k24(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-100, k=24, basic layers, no compression (28.1M params)."""
    model_args = dict(depth=100, growth_rate=24, block_type="basic", compression_rate=1.0)
    return _create_densenet("densenet100_k24", pretrained, **dict(model_args, **kwargs))


@register_model
def densenet_bc100_k12(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-100, k=12 (0.8M params)."""
    model_args = dict(depth=100, growth_rate=12, block_type="bottleneck", compression_rate=0.5)
    return _create_densenet("densenet_bc100_k12", pretrained, **dict(model_args, **kwargs))


@register_model
def densenet_bc250_k24(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-250, k=24 (15.3M params)."""
    model_args = dict(depth=250, growth_rate=24, block_type="bottleneck", compression_rate=0.5)
    return _create_densenet("densenet_bc250_k24", pretrained, **dict(model_args, **kwargs))


@register_model
def densenet_bc190_k40(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-190, k=40 (25.6M params)."""
    model_args = dict(depth=190, growth_rate=40, block_type="bottleneck", compression_rate=0.5)
    return _create_densenet("densenet_bc190_k40", pretrained, **dict(model_args, **kwargs))
