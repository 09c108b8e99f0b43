"""airbench94: the network of the fastest published CIFAR-10 training recipe, for 32x32 inputs.

Paper: `94% on CIFAR-10 in 3.29 Seconds on a Single GPU` (Keller Jordan, 2024) - https://arxiv.org/abs/2404.00498
Code: https://github.com/KellerJordan/cifar10-airbench (on the package index as `airbench`; version 0.1.8's
`lib_airbench94.py` is the reference this file is checked against by `scripts/compare_airbench.py`).

A frozen 2x2 patch-whitening conv (24 filters: the eigenvectors of the training images' 2x2 patch second-moment
matrix, scaled by 1 / sqrt(eigenvalue + eps), and their negatives) with a trainable bias, GELU, then three conv
groups (conv3x3 -> 2x2 max pool -> BN -> GELU -> conv3x3 -> BN -> GELU) of widths 64, 256, 256, a global max pool
and a bias-free linear classifier whose logits are multiplied by 1/9. BatchNorm keeps its scale frozen at 1 and
trains only its bias; its running statistics move by 0.4 per batch (airbench's "momentum 0.6" is the weight of the
old value) and its eps is 1e-12. Every conv starts as torch's default init with its first `in_channels` filters
replaced by the identity (Dirac) and its bias zero.

The whitening filters need the training images: `init_from_images` (the data-dependent initialisation the training
loop runs once, before the first step, on the first `model.data_init_images` training images) computes them.
Until then the stem holds its Dirac start, as the published network does before its whitening step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import generate_default_cfgs, register_model

from ._builder import INIT_MODES, CifarNet, build_cifar_model, cifar_cfg, init_dirac_, init_weights

__all__ = ["AirbenchConvGroup", "AirbenchHead", "AirbenchNet", "PatchWhitening", "ScaledLinear", "patch_moments"]

AIRBENCH_INIT_MODES = ("airbench", *INIT_MODES)


def patch_moments(images: torch.Tensor, kernel_size: int, chunk: int = 512) -> torch.Tensor:
    """The (uncentred) second-moment matrix of every `kernel_size` x `kernel_size` patch of `images`.

    Patches are taken at stride 1 without padding and flattened in (channel, row, column) order; the result is
    `sum_p x_p x_p^T / number of patches`, accumulated in float64 a chunk of images at a time.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    size = images.shape[1] * kernel_size**2
    moments = torch.zeros(size, size, dtype=torch.float64, device=images.device)
    count = 0
    for part in images.split(chunk):
        columns = F.unfold(part.double(), kernel_size).transpose(1, 2).reshape(-1, size)  # one row per patch
        moments += columns.T @ columns
        count += len(columns)
    if count == 0:
        raise ValueError("need at least one image to measure patch statistics")
    return moments / count


class PatchWhitening(nn.Conv2d):
    """A frozen conv whose 2 x C x k x k filters whiten the k x k patches of the training images.

    `init_from_images` sets the filters to the eigenvectors v of the patch second-moment matrix (largest eigenvalue
    first) scaled by 1 / sqrt(lambda + eps), followed by their negatives, so that after a GELU both signs of each
    whitened component pass. The weight never trains; the bias does (see the recipe's `train.freeze_after_epochs`).
    """

    def __init__(self, in_chans: int, kernel_size: int = 2, eps: float = 5e-4) -> None:
        super().__init__(in_chans, 2 * in_chans * kernel_size**2, kernel_size, padding=0, bias=True)
        if eps <= 0:
            raise ValueError(f"whitening eps must be > 0, got {eps}")
        self.eps = eps
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor) -> None:
        """Set the filters from normalised float images (N, C, H, W) on any device."""
        if images.shape[1] != self.in_channels:
            raise ValueError(f"the whitening layer takes {self.in_channels} channels, got images {tuple(images.shape)}")
        kernel = self.kernel_size[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(patch_moments(images, kernel), UPLO="U")  # ascending
        order = torch.arange(len(eigenvalues) - 1, -1, -1, device=eigenvalues.device)  # largest first
        filters = eigenvectors.T[order] / (eigenvalues[order, None] + self.eps).sqrt()
        filters = filters.reshape(-1, self.in_channels, kernel, kernel)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight.dtype))


class AirbenchConvGroup(nn.Module):
    """conv3x3 -> 2x2 max pool -> BN -> GELU -> conv3x3 -> BN -> GELU (BN scale frozen at 1)."""

    def __init__(self, in_chs: int, out_chs: int, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(out_chs, eps=bn_eps, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_chs, eps=bn_eps, momentum=bn_momentum)
        self.act = nn.GELU()
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class ScaledLinear(nn.Linear):
    """A bias-free linear layer whose output is multiplied by a fixed `scale` (airbench's 1/9 on the logits)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


class AirbenchHead(nn.Module):
    """Global pool (max by default) -> dropout -> `ScaledLinear`; the interface of timm's `ClassifierHead`."""

    def __init__(
        self, in_features: int, num_classes: int, pool_type: str = "max", drop_rate: float = 0.0, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.in_features = self.num_features = in_features
        self.scale = scale
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._classifier(num_classes)

    def _classifier(self, num_classes: int) -> nn.Module:
        return ScaledLinear(self.in_features, num_classes, self.scale) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.fc = self._classifier(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)


class AirbenchNet(CifarNet):
    """Whitening stem (level 0), three stages of one `AirbenchConvGroup` each (levels 1-3), global max pool, and a
    scaled bias-free linear classifier."""

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        whiten_kernel_size: int = 2,
        whiten_eps: float = 5e-4,
        bn_momentum: float = 0.4,
        bn_eps: float = 1e-12,
        logit_scale: float = 1 / 9,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "max",
        drop_rate: float = 0.0,
        init_mode: str = "airbench",
    ) -> None:
        """
        Args:
            widths: Output channels of the three conv groups.
            whiten_kernel_size: Side of the whitening patches; the stem has 2 x in_chans x side^2 filters.
            whiten_eps: Added to each eigenvalue before the 1 / sqrt scaling of the whitening filters.
            bn_momentum: torch's convention: the weight of each batch in the running statistics.
            bn_eps: BatchNorm's eps.
            logit_scale: Factor on the classifier's output.
            drop_rate: Dropout before the classifier (not in airbench; 0 reproduces it).
            init_mode: "airbench" (torch's default init, Dirac on each conv's first in_channels filters, zero conv
                biases) or one of `cifar_models._builder.INIT_MODES` (the seed's).
        """
        super().__init__()
        widths = tuple(widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {widths}")
        if init_mode not in AIRBENCH_INIT_MODES:
            raise ValueError(f"init_mode must be one of {', '.join(AIRBENCH_INIT_MODES)}; got {init_mode!r}")
        whiten = PatchWhitening(in_chans, whiten_kernel_size, whiten_eps)
        self.stem = nn.Sequential(OrderedDict(conv=whiten, act=nn.GELU()))
        self.feature_info = [dict(num_chs=whiten.out_channels, reduction=1, module="stem.act")]
        in_chs, stages = whiten.out_channels, []
        for index, out_chs in enumerate(widths):
            stages.append(nn.Sequential(AirbenchConvGroup(in_chs, out_chs, bn_momentum, bn_eps)))  # one block
            self.feature_info.append(dict(num_chs=out_chs, reduction=2 ** (index + 1), module=f"stages.{index}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.logit_scale = logit_scale
        self.build_head(num_classes, global_pool, drop_rate)
        if init_mode == "airbench":
            for module in self.modules():
                if isinstance(module, nn.Conv2d) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            init_dirac_(self)
        else:
            init_weights(self, init_mode)

    def build_head(self, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """`CifarNet.build_head` with `AirbenchHead`: a bias-free classifier with the logit scale."""
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        self.first_stage_level = 1
        self.head = AirbenchHead(self.num_features, num_classes, global_pool, drop_rate, self.logit_scale)

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor) -> None:
        """The data-dependent initialisation: whitening filters from normalised training images (N, C, H, W)."""
        self.stem.conv.init_from_images(images)


def _create_airbench(variant: str, pretrained: bool = False, **kwargs: Any) -> AirbenchNet:
    return build_cifar_model(AirbenchNet, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "airbench94": cifar_cfg(pool_size=(3, 3), paper_ids="arXiv:2404.00498"),
    }
)


@register_model
def airbench94(pretrained: bool = False, **kwargs: Any) -> AirbenchNet:
    """airbench94 (2.0M params): the network of Jordan's 94%-in-3.29-seconds CIFAR-10 recipe."""
    model_args = dict(widths=(64, 256, 256), whiten_kernel_size=2, bn_momentum=0.4, logit_scale=1 / 9)
    return _create_airbench("airbench94", pretrained, **dict(model_args, **kwargs))
