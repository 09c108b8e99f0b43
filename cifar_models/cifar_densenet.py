"""DenseNet and DenseNet-BC for CIFAR-sized inputs.

Paper: `Densely Connected Convolutional Networks` - https://arxiv.org/abs/1608.06993

Three dense stages joined by transitions (BN-ReLU-conv1x1-avgpool). Every layer appends
`growth_rate` channels to its input. The basic variant uses one BN-ReLU-conv3x3 per layer and no
compression; DenseNet-BC uses a 1x1 bottleneck of 4 * `growth_rate` channels and transitions that
keep `compression_rate` of the channels. The stem conv has 2 * `growth_rate` channels in both, as
in the seed project `hysts/pytorch_image_classification`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_classifier
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from ._builder import PooledLinearHead, build_cifar_model, cifar_cfg, init_weights

__all__ = ["DenseBasicLayer", "DenseBottleneckLayer", "DenseNet", "DenseTransition", "densenet_stage_channels"]

BLOCK_TYPES = ("basic", "bottleneck")


class DenseBasicLayer(nn.Module):
    """BN-ReLU-conv3x3 producing `growth_rate` new channels, concatenated to the input."""

    def __init__(self, in_chs: int, growth_rate: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.bn = nn.BatchNorm2d(in_chs)
        self.conv = nn.Conv2d(in_chs, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.relu(self.bn(x)))
        if self.drop_rate > 0.0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        return torch.cat([x, y], dim=1)


class DenseBottleneckLayer(nn.Module):
    """BN-ReLU-conv1x1 to 4 * `growth_rate`, then BN-ReLU-conv3x3 to `growth_rate`, concatenated to the input."""

    def __init__(self, in_chs: int, growth_rate: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        bottleneck_chs = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, bottleneck_chs, kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck_chs)
        self.conv2 = nn.Conv2d(bottleneck_chs, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        if self.drop_rate > 0.0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        if self.drop_rate > 0.0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        return torch.cat([x, y], dim=1)


class DenseTransition(nn.Module):
    """BN-ReLU-conv1x1 (channel compression) then 2x2 average pooling (halves the resolution)."""

    def __init__(self, in_chs: int, out_chs: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.bn = nn.BatchNorm2d(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.relu(self.bn(x)))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
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


class DenseNet(PooledLinearHead, nn.Module):
    """DenseNet(-BC) for 32x32 inputs: stem conv, three dense stages, final BN-ReLU, pooled linear head."""

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        block_type: str = "bottleneck",
        compression_rate: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        init_mode: str = "kaiming_fan_out",
    ) -> None:
        """
        Args:
            depth: number of weighted layers; 3n + 4 for 'basic', 6n + 4 for 'bottleneck'.
            growth_rate: channels added by every dense layer (k).
            block_type: 'basic' (conv3x3) or 'bottleneck' (conv1x1 to 4k, then conv3x3).
            compression_rate: fraction of channels a transition keeps (1.0 = no compression).
            drop_rate: dropout probability after every conv of the dense layers and transitions.
            num_classes: classifier outputs; 0 removes the classifier.
            in_chans: input image channels.
            global_pool: timm pooling type before the classifier; '' keeps the unpooled map.
            init_mode: conv weight initialisation, one of `_builder.INIT_MODES`.
        """
        super().__init__()
        stage_chs = densenet_stage_channels(depth, growth_rate, block_type, compression_rate)
        layer_cls = DenseBasicLayer if block_type == "basic" else DenseBottleneckLayer
        layers_per_stage = (stage_chs[0][1] - stage_chs[0][0]) // growth_rate
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv = nn.Conv2d(in_chans, stage_chs[0][0], kernel_size=3, stride=1, padding=1, bias=False)
        self.feature_info = [dict(num_chs=stage_chs[0][0], reduction=1, module="conv")]

        stages = []
        prev_chs, reduction = stage_chs[0][0], 1
        for stage_idx, (in_chs, out_chs) in enumerate(stage_chs):
            layers: list[nn.Module] = []
            if stage_idx > 0:
                layers.append(DenseTransition(prev_chs, in_chs, drop_rate))
                reduction *= 2
            layers += [layer_cls(in_chs + i * growth_rate, growth_rate, drop_rate) for i in range(layers_per_stage)]
            stages.append(nn.Sequential(*layers))
            prev_chs = out_chs
            if stage_idx < 2:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        # The last stage is reported after the final BN-ReLU, which makes it a usable feature map.
        self.norm = BatchNormAct2d(prev_chs)
        self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module="norm"))

        self.num_features = self.head_hidden_size = prev_chs
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
