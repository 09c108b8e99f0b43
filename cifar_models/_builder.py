"""Shared pieces of the CIFAR model families: default pretrained cfg, weight init, timm builder call.

Every family file builds its variants through `build_cifar_model`, so the timm contract
(pretrained cfg, `features_only`, `feature_info`) is wired the same way for all of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import build_model_with_cfg

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "INIT_MODES",
    "PooledLinearHead",
    "build_cifar_model",
    "cifar_cfg",
    "init_weights",
]

# Per-channel mean / std of the CIFAR-10 training set (pixel values in [0, 1]). The std is the
# true per-pixel std, not the 0.2023/0.1994/0.2010 values that circulate from an old typo.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

INIT_MODES = ("kaiming_fan_out", "kaiming_fan_in", "xavier_uniform", "xavier_normal")


def cifar_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """Default pretrained cfg for a CIFAR model: 32x32 RGB, 10 classes, CIFAR-10 statistics."""
    return {
        "url": url,
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv",
        "classifier": "fc",
        "license": "mit",
        **kwargs,
    }


def init_weights(model: nn.Module, mode: str = "kaiming_fan_out") -> None:
    """The seed's initialisation: conv and linear weights by `mode` (Kaiming normal), BN weight 1 / bias 0, biases 0."""
    if mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {', '.join(INIT_MODES)}; got {mode!r}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if mode == "kaiming_fan_out":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif mode == "kaiming_fan_in":
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif mode == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight, gain=1.0)
            else:
                nn.init.xavier_normal_(module.weight, gain=1.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if mode.startswith("kaiming"):
                nn.init.kaiming_normal_(module.weight, mode=mode[len("kaiming_") :], nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_cifar_model(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool = False,
    *,
    feature_levels: int,
    **kwargs: Any,
) -> nn.Module:
    """Build `model_cls` through timm's builder.

    `feature_levels` is how many entries the model's `feature_info` has (stem + stages); with
    `features_only=True` all of them are returned unless the caller passes `out_indices`. (It is not
    timm's `num_features`, which is the width of the last feature map.)
    """
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(feature_levels))),
        **kwargs,
    )


class PooledLinearHead:
    """timm's classifier methods for a model whose head is `self.global_pool` then `self.fc`.

    Mixed into model classes (before `nn.Module`) that set `num_classes`, `num_features`,
    `global_pool` and `fc` with `timm.layers.create_classifier`, and read `grad_checkpointing`.
    """

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (0 -> identity); `global_pool` '' drops pooling, None keeps it."""
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)
