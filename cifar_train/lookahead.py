"""Lookahead over a model's whole floating-point state, with a scheduled step, as airbench uses it.

Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", https://arxiv.org/abs/1907.08610;
its use in airbench: Jordan, https://arxiv.org/abs/2404.00498.

A slow copy of every floating-point entry of the model's state dict (parameters and BatchNorm running statistics)
is taken once, before the first step and after any data-dependent initialisation. Every `lookahead_steps` optimizer
steps, at step t of a run of T steps:

    d = lookahead_decay x (t / T) ** lookahead_decay_power      (computed in float32, as airbench does)
    slow = d x slow + (1 - d) x fast;   fast = slow

and after the last step the model is set to the slow copy (the fast steps since the last sync are dropped). With
`lookahead_decay_power = 0` the share is constant: Zhang et al.'s Lookahead with alpha = 1 - lookahead_decay.

Why not `timm.optim.Lookahead`: it wraps the optimizer, so it averages only the parameters that have gradients
(airbench also averages the BatchNorm statistics, which then match the averaged weights), its alpha is fixed
(airbench's slow share grows from 0 to 0.95^5 as (t / T)^3), it takes its slow copy at its first sync rather than
at the start, and it ends on the fast weights. The slow copy is saved in each checkpoint (`state_dict`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ModelLookahead"]


class ModelLookahead:
    """Slow weights for `model`; call `step(t)` after optimizer step t (1-based). The keywords are the recipe's
    `train.lookahead_*` settings and the run's number of optimizer steps."""

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        lookahead_steps: int,  # optimizer steps between syncs
        lookahead_decay: float,  # the slow weights' share at a sync
        lookahead_decay_power: float,  # that share times (t / T) ** this
    ) -> None:
        if lookahead_steps < 1 or total_steps < 1:
            raise ValueError(f"lookahead_steps and total_steps must be >= 1, got {lookahead_steps}, {total_steps}")
        if not 0.0 <= lookahead_decay <= 1.0 or lookahead_decay_power < 0:
            raise ValueError(
                f"lookahead_decay must be in [0, 1] and lookahead_decay_power >= 0, got {lookahead_decay}, "
                f"{lookahead_decay_power}"
            )
        self.model = model
        self.total_steps = total_steps
        self.every = lookahead_steps
        # the slow share after every step, computed in float32 as airbench does (decay x (t / T) ** power), held as
        # Python floats: the hot loop reads no tensor
        shares = lookahead_decay * (torch.arange(total_steps + 1) / total_steps) ** lookahead_decay_power
        self.decays: list[float] = shares.tolist()
        with torch.no_grad():
            self.slow = {name: value.clone() for name, value in self._fast().items()}

    def _fast(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in self.model.state_dict().items() if value.is_floating_point()}

    def decay(self, step: int) -> float:
        """The slow weights' share at a sync after optimizer step `step`."""
        return self.decays[min(step, self.total_steps)]

    @torch.no_grad()
    def sync(self, decay: float) -> None:
        """slow = decay x slow + (1 - decay) x fast, then fast = slow (every floating-point state entry)."""
        for name, fast in self._fast().items():
            slow = self.slow[name]
            slow.lerp_(fast, 1.0 - decay)
            fast.copy_(slow)

    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based): a sync every `lookahead_steps` steps; after the last step, the
        model takes the slow weights."""
        if step % self.every == 0:
            self.sync(self.decay(step))
        if step >= self.total_steps:
            self.sync(1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The slow weights (contiguous, for safetensors)."""
        return {name: value.contiguous() for name, value in self.slow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.slow) ^ set(state))
        if missing:
            raise ValueError(f"the Lookahead state does not fit the model: {', '.join(missing[:5])}")
        with torch.no_grad():
            for name, value in state.items():
                self.slow[name].copy_(value)
