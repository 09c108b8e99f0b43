"""The seed's own optimizers, vectorised with `torch._foreach` ops.

LARS here is the seed's variant of You et al., "Large Batch Training of Convolutional Networks"
(https://arxiv.org/abs/1708.03888): no trust coefficient, a weight-norm threshold below which the layer keeps
the global rate, and the learning rate inside the momentum buffer. It is not timm's `Lars`.

AdaBound follows Luo et al., "Adaptive Gradient Methods with Dynamic Bound of Learning Rate"
(https://arxiv.org/abs/1902.09843) as in the authors' reference implementation, which the seed used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["LARS", "AdaBound"]


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
