"""Optimizers: the seed's set (SGD, Adam, AMSGrad, AdamW, LARS, AdaBound, AdaBoundW) plus every timm optimizer.

LARS here is the seed's variant of You et al., "Large Batch Training of Convolutional Networks"
(https://arxiv.org/abs/1708.03888): no trust coefficient, a weight-norm threshold below which the layer keeps
the global rate, and the learning rate inside the momentum buffer. It is not timm's `Lars`.

AdaBound follows Luo et al., "Adaptive Gradient Methods with Dynamic Bound of Learning Rate"
(https://arxiv.org/abs/1902.09843) as in the authors' reference implementation, which the seed used.

"No weight decay on BN" picks parameters by what they are (a normalisation layer's parameters, any
module's `bias`), never by a substring of their name: the seed's `'conv.weight' in name` rule also
exempted the final linear layer. The same rule picks the normalisation biases that airbench
(https://arxiv.org/abs/2404.00498) trains at 64 times the learning rate and 1/64 of the weight decay
(`norm_bias_lr_scale`, `norm_bias_weight_decay_scale`), so that their decay per step, lr x wd, is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import timm.optim
import torch
from timm.layers import evo_norm, filter_response_norm, norm, norm_act
from torch import nn

from cifar_train.errors import UserError, did_you_mean
from cifar_train.schema import Findings, checked_section

__all__ = [
    "LARS",
    "OPTIMIZER_NAMES",
    "OWN_OPTIMIZER_NAMES",
    "AdaBound",
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


def _check_non_negative(value: float, what: str) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {what}: {value}")


def _check_betas(betas: tuple[float, float]) -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


class LARS(torch.optim.Optimizer):
    """The seed's LARS. For each parameter w with gradient g (norms are whole-tensor L2 norms):

    local_lr = |w| / (eps + |g| + weight_decay * |w|), or 1 where |w| < thresh
    buf = momentum * buf + lr * local_lr * (g + weight_decay * w)      (buf starts at 0)
    w = w - buf
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        thresh: float = 1e-2,
    ) -> None:
        _check_non_negative(lr, "learning rate")
        _check_non_negative(momentum, "momentum value")
        _check_non_negative(weight_decay, "weight_decay value")
        _check_non_negative(eps, "epsilon value")
        _check_non_negative(thresh, "LARS threshold")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, thresh=thresh)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # torch._foreach_* kernels want tensors of one device and dtype per call
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                self._update(params, **{k: group[k] for k in ("lr", "momentum", "weight_decay", "eps", "thresh")})
        return loss

    def _update(
        self, params: list[torch.Tensor], *, lr: float, momentum: float, weight_decay: float, eps: float, thresh: float
    ) -> None:
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])

        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        local_lr = w_norm / (eps + g_norm + weight_decay * w_norm)
        local_lr = torch.where(w_norm < thresh, torch.ones_like(local_lr), local_lr)
        scale = (lr * local_lr).unbind()

        if weight_decay != 0:
            update = torch._foreach_add(grads, params, alpha=weight_decay)
            torch._foreach_mul_(update, scale)
        else:
            update = torch._foreach_mul(grads, scale)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, update)
        torch._foreach_sub_(params, bufs)


class AdaBound(torch.optim.Optimizer):
    """AdaBound: Adam whose per-element step size is clipped to bounds that close in on `final_lr`
    (SGD's rate) at a speed set by `gamma`, so training moves from Adam-like to SGD-like.

    `decoupled_weight_decay=True` is AdaBoundW: after the update, w -= weight_decay * w (not scaled by the
    learning rate, as in the reference implementation); otherwise weight decay is an L2 term added to the
    gradient. A learning-rate schedule scales `final_lr` by lr / (lr at construction), so the bounds follow
    the schedule too. `amsbound=True` normalises by the running maximum of the second moment.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsbound: bool = False,
    ) -> None:
        _check_non_negative(lr, "learning rate")
        _check_betas(betas)
        _check_non_negative(final_lr, "final learning rate")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"Invalid gamma parameter: {gamma} (must be in (0, 1))")
        _check_non_negative(eps, "epsilon value")
        _check_non_negative(weight_decay, "weight_decay value")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            final_lr=final_lr,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsbound=amsbound,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])  # the reference for scaling final_lr; kept in state_dict

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # torch._foreach_* kernels want one device and dtype per call; the bias correction wants one step count
            buckets: dict[tuple[torch.device, torch.dtype, int], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaBound does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsbound"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets.setdefault((p.device, p.dtype, state["step"]), []).append(p)
            for (_, _, t), params in buckets.items():
                self._update(params, t, group)
        return loss

    def _update(self, params: list[torch.Tensor], t: int, group: dict[str, Any]) -> None:
        """One AdaBound step at step count `t` for parameters of one device and dtype."""
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        final_lr = group["final_lr"] * lr / group["base_lr"] if group["base_lr"] > 0 else 0.0
        states = [self.state[p] for p in params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        grads = [p.grad for p in params]
        if wd != 0 and not group["decoupled_weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=wd)

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if group["amsbound"]:
            max_sqs = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(max_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, group["eps"])

        # step = clamp(adam_step / denom, lower, upper) * exp_avg
        adam_step = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
        upper = final_lr * (1 + 1 / (group["gamma"] * t))
        step = torch._foreach_reciprocal(denom)
        torch._foreach_mul_(step, adam_step)
        torch._foreach_clamp_min_(step, lower)
        torch._foreach_clamp_max_(step, upper)
        torch._foreach_mul_(step, exp_avgs)
        if wd != 0 and group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1 - wd)
        torch._foreach_sub_(params, step)


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
