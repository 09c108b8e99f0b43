"""Optimizers: the seed's set (SGD, Adam, AMSGrad, AdamW, LARS, AdaBound, AdaBoundW) plus every timm optimizer.

The seed's own LARS and AdaBound live in `seed_optimizers.py`.

"No weight decay on BN" picks parameters by what they are (a normalisation layer's parameters, any
module's `bias`), never by a substring of their name: the seed's `'conv.weight' in name` rule also
exempted the final linear layer. The same rule picks the normalisation biases that airbench
(https://arxiv.org/abs/2404.00498) trains at 64 times the learning rate and 1/64 of the weight decay
(`norm_bias_lr_scale`, `norm_bias_weight_decay_scale`), so that their decay per step, lr x wd, is unchanged.
"""

from __future__ import annotations

from typing import Any

import timm.optim
import torch
from timm.layers import evo_norm, filter_response_norm, norm, norm_act
from torch import nn

from cifar_train.errors import UserError, did_you_mean
from cifar_train.schema import Findings, checked_section
from cifar_train.seed_optimizers import LARS, AdaBound

__all__ = [
    "OPTIMIZER_NAMES",
    "OWN_OPTIMIZER_NAMES",
    "check_optim",
    "check_optimizer",
    "create_optimizer",
    "param_groups",
]

OWN_OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adam", "amsgrad", "adamw", "lars", "adabound", "adaboundw")
_TIMM_NAMES = frozenset(timm.optim.list_optimizers())
# ours first; the rest go to timm.optim.create_optimizer_v2 (ours win where timm has the same name, e.g. 'lars').
# timm's 'lookahead_<name>' wrappers are accepted too.
OPTIMIZER_NAMES: tuple[str, ...] = OWN_OPTIMIZER_NAMES + tuple(sorted(_TIMM_NAMES - set(OWN_OPTIMIZER_NAMES)))


def _module_classes(*modules: Any) -> tuple[type[nn.Module], ...]:
    """Every nn.Module subclass defined in the given Python modules."""
    return tuple(
        c
        for m in modules
        for c in vars(m).values()
        if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == m.__name__
    )


# Module types whose parameters are normalisation affine terms (scale, shift, EvoNorm's v, ...).
# torch's BatchNorm/InstanceNorm/SyncBatchNorm share _NormBase; timm's norm files add RmsNorm, EvoNorm, FRN, ...
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    *_module_classes(norm, norm_act, evo_norm, filter_response_norm),
)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    no_weight_decay_on_bn: bool,
    lr: float | None = None,
    norm_bias_lr_scale: float = 1.0,
    norm_bias_weight_decay_scale: float = 1.0,
) -> list[dict]:
    """Parameter groups for an optimizer: one group with `weight_decay`, and, when `no_weight_decay_on_bn`,
    a second with weight decay 0 holding every normalisation-layer parameter and every bias.

    When either `norm_bias_*_scale` is not 1, the biases of normalisation layers form a group of their own with
    lr `lr x norm_bias_lr_scale` and weight decay `x norm_bias_weight_decay_scale` (0 under
    `no_weight_decay_on_bn`); it comes last, so group 0 keeps the base lr. Conv and linear weights (the
    classifier's too) always keep the weight decay. Empty groups are left out.
    """
    own_norm_biases = norm_bias_lr_scale != 1.0 or norm_bias_weight_decay_scale != 1.0
    if not no_weight_decay_on_bn and not own_norm_biases:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    norm_biases: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for role, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # shared (tied) parameters go where they were met first
                continue
            seen.add(id(param))
            if own_norm_biases and is_norm and role == "bias":
                norm_biases.append(param)
            elif no_weight_decay_on_bn and (is_norm or role == "bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if norm_biases:
        if lr is None:
            raise ValueError("scaling the normalisation biases' learning rate needs the base lr")
        norm_decay = 0.0 if no_weight_decay_on_bn else weight_decay * norm_bias_weight_decay_scale
        groups.append({"params": norm_biases, "weight_decay": norm_decay, "lr": lr * norm_bias_lr_scale})
    return [g for g in groups if g["params"]]


def check_optimizer(name: str) -> None:
    """Raise a UserError (with "did you mean") when `name` is neither ours nor timm's."""
    base_name = name.removeprefix("lookahead_")  # timm wraps any of its optimizers in Lookahead this way
    if name not in OPTIMIZER_NAMES and not (name.startswith("lookahead_") and base_name in _TIMM_NAMES):
        raise UserError(
            f"unknown optim.name {name!r}{did_you_mean(name.lower(), OPTIMIZER_NAMES)}; ours are "
            f"{', '.join(OWN_OPTIMIZER_NAMES)}, and any name in timm.optim.list_optimizers() works too"
        )


def check_optim(**settings: Any) -> Findings:
    """The `[optim]` rules (missing settings at the schema's defaults; ranges come from the schema; the name is
    checked by `check_optimizer`, in the order a user fixes things): returns the settings with no effect."""
    o = checked_section("optim", settings)
    for index, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            raise UserError(f"optim.betas = [{o.betas[0]}, {o.betas[1]}]: beta {index + 1} must be in [0, 1)")
    if o.nesterov and o.momentum == 0 and o.name == "sgd":
        raise UserError("optim.nesterov = true needs optim.momentum > 0")
    found = Findings()
    if o.no_weight_decay_on_bn:
        found.ignored["optim.norm_bias_weight_decay_scale"] = "optim.no_weight_decay_on_bn = true gives them none"
    uses = {
        "momentum": ("sgd", "lars"),
        "nesterov": ("sgd",),
        "betas": ("adam", "amsgrad", "adamw", "adabound", "adaboundw"),
        "lars_eps": ("lars",),
        "lars_thresh": ("lars",),
        "adabound_final_lr": ("adabound", "adaboundw"),
        "adabound_gamma": ("adabound", "adaboundw"),
    }
    if o.name in OWN_OPTIMIZER_NAMES:  # timm's optimizers take what they take
        for key, users in uses.items():
            if o.name not in users:
                found.ignored[f"optim.{key}"] = f"optim.name = {o.name!r} does not use it"
    return found


def _fused(groups: list[dict]) -> bool:
    """Whether torch's fused kernels can take these parameters: one kernel per step instead of a loop over
    tensors, and a `found_inf` flag that skips a step on the device (see `cifar_train.step`)."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


def create_optimizer(
    model: nn.Module,
    *,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 1e-4,
    no_weight_decay_on_bn: bool = False,
    norm_bias_lr_scale: float = 1.0,
    norm_bias_weight_decay_scale: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    lars_eps: float = 1e-9,
    lars_thresh: float = 1e-2,
    adabound_final_lr: float = 0.1,
    adabound_gamma: float = 1e-3,
) -> torch.optim.Optimizer:
    """The optimizer `name` over `model`'s parameters (grouped by `param_groups`).

    The keywords are the recipe's `[optim]` section (`section_kwargs(recipe.optim)`); their defaults are the
    schema's. Ours: sgd (momentum, optionally Nesterov), adam and amsgrad (L2 weight decay, as the seed),
    adamw — these three use torch's fused kernels — lars (the seed's, above), adabound and adaboundw. Any
    other name goes to `timm.optim.create_optimizer_v2` with lr, weight_decay, momentum and betas where that
    optimizer takes them. Build it after moving the model to its device. Bad values raise UserError.
    """
    settings = dict(locals())
    del settings["model"]
    check_optim(**settings)
    check_optimizer(name)
    groups = param_groups(
        model,
        weight_decay=weight_decay,
        no_weight_decay_on_bn=no_weight_decay_on_bn,
        lr=lr,
        norm_bias_lr_scale=norm_bias_lr_scale,
        norm_bias_weight_decay_scale=norm_bias_weight_decay_scale,
    )
    betas = tuple(betas)
    fused = _fused(groups)
    try:
        if name == "sgd":
            return torch.optim.SGD(
                groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, fused=fused
            )
        if name in ("adam", "amsgrad"):
            return torch.optim.Adam(
                groups, lr=lr, betas=betas, weight_decay=weight_decay, amsgrad=name == "amsgrad", fused=fused
            )
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
        if name == "lars":
            return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=lars_eps, thresh=lars_thresh)
        if name in ("adabound", "adaboundw"):
            return AdaBound(
                groups,
                lr=lr,
                betas=betas,
                final_lr=adabound_final_lr,
                gamma=adabound_gamma,
                weight_decay=weight_decay,
                decoupled_weight_decay=name == "adaboundw",
            )
        info = timm.optim.get_optimizer_info(name.removeprefix("lookahead_"))
        extra = {"betas": betas} if info.has_betas and info.num_betas == len(betas) else {}
        return timm.optim.create_optimizer_v2(
            groups, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum, **extra
        )
    except ValueError as err:  # torch's, timm's and ours: "Invalid learning rate: -0.1" and the like
        raise UserError(f"optimizer {name!r}: {err}") from err
