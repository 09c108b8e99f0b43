"""Per-iteration learning-rate schedules that match the seed's curves step for step.

The learning rate of optimizer step k (k = 0, 1, ...) is `base_lr * lr_factor(k)`. Warmup, if any, takes
the first `warmup_epochs * steps_per_epoch` steps (Tw); the main schedule the rest, on its own clock
t = k - Tw, with T = (epochs - warmup_epochs) * steps_per_epoch steps.

- warmup linear: start + (1 - start) * k / Tw;  exponential: start + (1 - start) * (k / Tw) ** exponent
  (the seed multiplied the exponential warmup by the base learning rate a second time; we do not).
- constant: 1.  linear: 1 + (min - 1) * t / T.  cosine: min + (1 - min) * (1 + cos(pi * t / T)) / 2.
- multistep: times `decay` for each milestone passed. Milestones are epochs of the main schedule, counted
  from the end of warmup, as in the seed (they are the same as epochs of training when there is no warmup).
- sgdr (Loshchilov & Hutter, https://arxiv.org/abs/1608.03983): cosine restarted at the end of each period;
  periods are T0, T0 * T_mul, T0 * T_mul**2, ... epochs and must add up to the main schedule exactly.

Conventions copied from the seed (its piecewise scheduler evaluated by LambdaLR, stepped after every
optimizer step): step k's factor is computed at k, and where one piece meets the next the earlier piece
is used at its end. So warmup reaches exactly 1 at step Tw; a multistep milestone m takes effect from
step Tw + m * steps_per_epoch + 1, not one step earlier; SGDR's step at a restart boundary is the minimum
of the cycle that ends there and the next step starts the new cycle at cos(pi / period). Steps past the
end of training hold the final value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cifar_train.errors import UserError, did_you_mean

__all__ = ["SCHEDULE_NAMES", "WARMUP_NAMES", "build_lr_scheduler", "lr_factor"]

SCHEDULE_NAMES = ("constant", "multistep", "linear", "cosine", "sgdr")
WARMUP_NAMES = ("none", "linear", "exponential")


def _sgdr_periods(t0: int, t_mul: int, epochs: int) -> list[int]:
    """SGDR's periods in epochs, T0, T0 * T_mul, ..., until they cover at least `epochs`."""
    periods = [t0]
    while sum(periods) < epochs:
        periods.append(periods[-1] * t_mul)
    return periods


@dataclass(frozen=True)
class _Curve:
    """A validated schedule in steps; calling it gives the factor of one step."""

    name: str
    warmup: str
    warmup_steps: int  # Tw
    main_steps: int  # T
    boundaries: tuple[int, ...]  # multistep: milestones; sgdr: cycle starts (from 0); steps on the main clock
    decay: float
    min_factor: float
    warmup_start_factor: float
    warmup_exponent: float

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        step = min(step, self.warmup_steps + self.main_steps)
        if step <= self.warmup_steps and self.warmup_steps > 0:
            x = step / self.warmup_steps
            if self.warmup == "exponential":
                x = x**self.warmup_exponent
            return self.warmup_start_factor + (1 - self.warmup_start_factor) * x
        t = step - self.warmup_steps
        if self.name == "constant":
            return 1.0
        if self.name == "multistep":
            return self.decay ** bisect.bisect_left(self.boundaries, t)  # milestones strictly before t
        if self.name == "linear":
            return 1 + (self.min_factor - 1) * t / self.main_steps
        if self.name == "cosine":
            return self._cosine(t, self.main_steps)
        # sgdr: the cycle whose (start, end] holds t; the first cycle also holds t = 0
        cycle = max(bisect.bisect_left(self.boundaries, t) - 1, 0)
        start = self.boundaries[cycle]
        end = self.boundaries[cycle + 1] if cycle + 1 < len(self.boundaries) else self.main_steps
        return self._cosine(t - start, end - start)

    def _cosine(self, t: int, period: int) -> float:
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * t / period)) / 2


def _curve(
    *,
    steps_per_epoch: int,
    epochs: int,
    name: str,
    milestones: Sequence[int],
    decay: float,
    min_factor: float,
    sgdr_t0: int,
    sgdr_t_mul: int,
    warmup: str,
    warmup_epochs: int,
    warmup_start_factor: float,
    warmup_exponent: float,
) -> _Curve:
    """Check every argument (UserError naming the bad value) and build the curve."""
    if name not in SCHEDULE_NAMES:
        raise UserError(
            f"unknown schedule {name!r}{did_you_mean(name, SCHEDULE_NAMES)}; choose one of {', '.join(SCHEDULE_NAMES)}"
        )
    if warmup not in WARMUP_NAMES:
        raise UserError(
            f"unknown warmup {warmup!r}{did_you_mean(warmup, WARMUP_NAMES)}; choose one of {', '.join(WARMUP_NAMES)}"
        )
    if steps_per_epoch < 1:
        raise UserError(f"steps_per_epoch = {steps_per_epoch} must be >= 1")
    if epochs < 1:
        raise UserError(f"epochs = {epochs} must be >= 1")
    if not 0 <= warmup_epochs < epochs:
        raise UserError(f"warmup_epochs = {warmup_epochs} must be in [0, epochs - 1 = {epochs - 1}]")
    if (warmup == "none") != (warmup_epochs == 0):
        raise UserError(
            f"warmup = {warmup!r} with warmup_epochs = {warmup_epochs} contradict: "
            "warmup 'none' needs warmup_epochs = 0, and 'linear' or 'exponential' need warmup_epochs >= 1"
        )
    if not 0.0 <= warmup_start_factor <= 1.0:
        raise UserError(f"warmup_start_factor = {warmup_start_factor} must be in [0, 1]")
    if not warmup_exponent > 0.0:
        raise UserError(f"warmup_exponent = {warmup_exponent} must be > 0")
    if not 0.0 <= min_factor <= 1.0:
        raise UserError(f"min_factor = {min_factor} must be in [0, 1]")
    if not 0.0 < decay <= 1.0:
        raise UserError(f"decay = {decay} must be in (0, 1]")

    main_epochs = epochs - warmup_epochs
    boundaries: tuple[int, ...] = ()
    if name == "multistep":
        ms = list(milestones)
        if ms != sorted(set(ms)) or any(not 0 < m < main_epochs for m in ms):
            raise UserError(
                f"milestones = {ms!r} must be strictly increasing epochs between 1 and {main_epochs - 1} "
                f"(epochs - warmup_epochs - 1; milestones count from the end of warmup)"
            )
        boundaries = tuple(m * steps_per_epoch for m in ms)
    elif name == "sgdr":
        if sgdr_t0 < 1 or sgdr_t_mul < 1:
            raise UserError(f"sgdr_t0 = {sgdr_t0} and sgdr_t_mul = {sgdr_t_mul} must both be >= 1")
        periods = _sgdr_periods(sgdr_t0, sgdr_t_mul, main_epochs)
        if sum(periods) != main_epochs:
            ends = [sum(periods[: i + 1]) for i in range(len(periods))]
            raise UserError(
                f"SGDR periods (sgdr_t0 = {sgdr_t0}, sgdr_t_mul = {sgdr_t_mul}) end at epochs "
                f"{', '.join(map(str, ends))}, not at epochs - warmup_epochs = {main_epochs}; "
                "make epochs - warmup_epochs one of those"
            )
        boundaries = tuple(steps_per_epoch * sum(periods[:i]) for i in range(len(periods)))
    return _Curve(
        name=name,
        warmup=warmup,
        warmup_steps=warmup_epochs * steps_per_epoch,
        main_steps=main_epochs * steps_per_epoch,
        boundaries=boundaries,
        decay=decay,
        min_factor=min_factor,
        warmup_start_factor=warmup_start_factor,
        warmup_exponent=warmup_exponent,
    )


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    name: str,
    milestones: Sequence[int] = (),
    decay: float = 0.1,
    min_factor: float = 1e-3,
    sgdr_t0: int = 10,
    sgdr_t_mul: int = 1,
    warmup: str = "none",
    warmup_epochs: int = 0,
    warmup_start_factor: float = 1e-3,
    warmup_exponent: float = 4.0,
) -> float:
    """The factor on the base learning rate for optimizer step `step` (from 0); the reference definition.

    `milestones`, `sgdr_t0` and `warmup_epochs` are in epochs; see the module docstring for the formulas.
    """
    curve = _curve(
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        name=name,
        milestones=milestones,
        decay=decay,
        min_factor=min_factor,
        sgdr_t0=sgdr_t0,
        sgdr_t_mul=sgdr_t_mul,
        warmup=warmup,
        warmup_epochs=warmup_epochs,
        warmup_start_factor=warmup_start_factor,
        warmup_exponent=warmup_exponent,
    )
    return curve(step)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    name: str,
    milestones: Sequence[int] = (),
    decay: float = 0.1,
    min_factor: float = 1e-3,
    sgdr_t0: int = 10,
    sgdr_t_mul: int = 1,
    warmup: str = "none",
    warmup_epochs: int = 0,
    warmup_start_factor: float = 1e-3,
    warmup_exponent: float = 4.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR giving `lr_factor`'s curve; call its `step()` once after every optimizer step.

    `steps_per_epoch` counts optimizer steps (after gradient accumulation). On creation each group's lr is
    set to its base lr times the factor of step 0. The state dict holds the position (`last_epoch`) and the
    base learning rates only, not the schedule's settings, which come from the recipe on resume.
    """
    curve = _curve(
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        name=name,
        milestones=milestones,
        decay=decay,
        min_factor=min_factor,
        sgdr_t0=sgdr_t0,
        sgdr_t_mul=sgdr_t_mul,
        warmup=warmup,
        warmup_epochs=warmup_epochs,
        warmup_start_factor=warmup_start_factor,
        warmup_exponent=warmup_exponent,
    )

    # A plain function, not the curve object: LambdaLR would otherwise save the curve's fields in its state
    # dict and, on load, silently replace the recipe's schedule with the checkpoint's.
    def factor(step: int) -> float:
        return curve(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
