"""Shared pieces of the CIFAR model families: the `CifarNet` base, pretrained cfg, weight init, timm builder call.

Every family's model class derives from `CifarNet` and every variant is built through `build_cifar_model`, so
timm's contract (classifier head, `forward_intermediates`, pretrained cfg, `features_only`, `feature_info`) is
written once and wired the same way for all of them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "INIT_MODES",
    "CifarNet",
    "build_cifar_model",
    "cifar_cfg",
    "conv_stem",
    "init_dirac_",
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
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


def conv_stem(in_chans: int, out_chs: int, *, norm: bool = False, act: bool = False) -> nn.Sequential:
    """The CIFAR stem: a 3x3 stride-1 conv (`stem.conv`), optionally BatchNorm (`stem.bn`) and ReLU (`stem.act`)."""
    layers = OrderedDict(conv=nn.Conv2d(in_chans, out_chs, kernel_size=3, stride=1, padding=1, bias=False))
    if norm:
        layers["bn"] = nn.BatchNorm2d(out_chs)
    if act:
        layers["act"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


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


def init_dirac_(model: nn.Module) -> None:
    """Identity (Dirac) start for every 2-D conv of `model` with groups = 1: its first min(in, out) filters pass
    input channel i to output channel i unchanged (a 1 at the kernel's centre, row and column k // 2, 0 elsewhere);
    the other filters keep their init. Grouped convs are left alone. As airbench's convs start."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.groups == 1:
                nn.init.dirac_(module.weight[: module.in_channels])


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


class CifarNet(nn.Module):
    """timm's model contract, written once for every CIFAR family.

    A family's `__init__` builds its layers in the order data flows through them, then calls `build_head`:

    - `stem`: the input layers; feature level 0 (VGG has none: an `nn.Identity` that is no level);
    - `stages`: an `nn.Sequential` of stages, one feature level each;
    - `norm`: what follows the last stage (the final BN-ReLU of the pre-activation nets, a ReLU, or an
      `nn.Identity`). The last feature level is taken after it, so `features_only`, `forward_intermediates`
      and the head all see the same map;
    - `feature_info`: one dict per feature level, in that order;
    - `head`: timm's `ClassifierHead`, global pool -> dropout (`drop_rate`) -> linear.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    def build_head(self, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """Add the classifier on the last feature level, and the attributes timm reads (`num_classes`, `drop_rate`,
        `num_features`, `head_hidden_size`); call it after `stem`, `stages`, `norm` and `feature_info` are set."""
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        self.first_stage_level = len(self.feature_info) - len(self.stages)  # 1 when the stem is a level, else 0
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"
        return dict(stem=r"^stem", blocks=[(blocks, None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (0 -> identity); `global_pool` '' drops pooling, None keeps it."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)  # one segment per block
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns the feature maps of the `feature_info` levels.

        Args:
            x: Input images.
            indices: The last n levels if an int, all if None, the listed levels (negative from the end) if a list.
            norm: Unused: the final `norm` is already part of the last level, and sized for it alone.
            stop_early: Stop after the last level asked for; the final features are then that level's map.
            output_fmt: Layout of the maps; only 'NCHW'.
            intermediates_only: Return only the maps.

        Returns:
            The final features (as `forward_features`) and the list of maps, or only the maps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for CIFAR models; got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_level = len(self.feature_info) - 1
        intermediates = []
        x = self.stem(x)
        if self.first_stage_level == 1 and 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[: max_index - self.first_stage_level + 1] if stop_early else self.stages
        checkpointed = self.grad_checkpointing and not torch.jit.is_scripting()
        for level, stage in enumerate(stages, start=self.first_stage_level):
            x = checkpoint_seq(stage, x) if checkpointed else stage(x)
            if level == last_level:
                x = self.norm(x)
            if level in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last level in `indices`, and the head; returns the kept levels.

        `prune_norm` is unused: the final `norm` belongs to the last level and goes only with it. A model
        cut short has no head whatever `prune_head` says, since the head is sized for the last level.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[: max_index - self.first_stage_level + 1]
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.num_classes = 0
            self.head = ClassifierHead(self.num_features, 0, pool_type="", drop_rate=self.drop_rate)
        return take_indices
