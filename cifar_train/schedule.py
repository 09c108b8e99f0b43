"""Per-iteration learning-rate schedules that match the seed's curves step for step.

The learning rate of optimizer step k (k = 0, 1, ...) is `base_lr * curve(k)`. Warmup, if any, takes the
first `warmup_epochs * steps_per_epoch` steps (Tw); the main schedule the rest, on its own clock t = k - Tw,
with T = run_steps(steps_per_epoch, epochs) - Tw steps: (epochs - warmup_epochs) * steps_per_epoch for whole
epochs; a fractional `epochs` (airbench trains 9.9) runs ceil(steps_per_epoch x epochs) steps in all, the
epochs read as the decimal written (so 100 steps x 1.1 epochs is 110 steps, not 111), and its last epoch stops
after the steps left.

- warmup linear: start + (1 - start) * k / Tw;  exponential: start + (1 - start) * (k / Tw) ** exponent
  (the seed multiplied the exponential warmup by the base learning rate a second time; we do not).
- constant: 1.  linear: 1 + (min - 1) * t / T.  cosine: min + (1 - min) * (1 + cos(pi * t / T)) / 2.
- multistep: times `decay` for each milestone passed. Milestones are epochs of the main schedule, counted
  from the end of warmup, as in the seed. A milestone at or after the end never takes effect (as with torch's
  MultiStepLR): the recipe loads, with a warning, so a shortened recipe still runs.
- triangle (airbench, https://arxiv.org/abs/2404.00498): piecewise linear from `triangle_start_factor` at t = 0
  to 1 at t = P = floor(triangle_peak x T), then to `min_factor` at t = T; t >= P is on the falling side.
- sgdr (Loshchilov & Hutter, https://arxiv.org/abs/1608.03983): cosine restarted at the end of each period;
  periods are T0, int(T0 * T_mul), int(int(T0 * T_mul) * T_mul), ... epochs (T_mul may be fractional, as in
  the seed). A last period that training ends inside is cut short, with a warning.

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
from fractions import Fraction
from typing import Any

import torch

from .errors import UserError
from .schema import Findings, check_fields, checked_section

__all__ = [
    "EXTENDABLE",
    "ScheduleCurve",
    "check_extension",
    "check_schedule",
    "create_scheduler",
    "epoch_count",
    "run_steps",
    "schedule_curve",
]


def run_steps(steps_per_epoch: int, epochs: int | float) -> int:
    """Optimizer steps of a run: ceil(steps_per_epoch x epochs), `epochs` read as the decimal it is written as
    (`Fraction(repr(9.9))` is 99/10: 48 steps x 9.9 epochs is 476 steps, and 100 x 1.1 is 110, not 111)."""
    exact = Fraction(repr(epochs)) if isinstance(epochs, float) else Fraction(epochs)
    return math.ceil(steps_per_epoch * exact)


def epoch_count(epochs: int | float) -> int:
    """Epochs a run starts: a fractional last epoch counts as one (9.9 -> 10)."""
    return math.ceil(Fraction(repr(epochs)) if isinstance(epochs, float) else epochs)


def _sgdr_periods(t0: int, t_mul: float, epochs: int) -> list[int]:
    """SGDR's periods in epochs, T0, int(T0 * T_mul), ..., until they cover at least `epochs`."""
    periods = [t0]
    while sum(periods) < epochs:
        periods.append(max(1, int(periods[-1] * t_mul)))
    return periods


def check_schedule(*, epochs: int | float, **settings: Any) -> Findings:
    """The `[schedule]` rules for a run of `epochs` (missing settings at the schema's defaults; ranges come from
    the schema): raises UserError on a contradiction; reports ignored settings and warnings."""
    check_fields("train", {"epochs": epochs})
    s = checked_section("schedule", settings)
    name, milestones, warmup, warmup_epochs = s.name, s.milestones, s.warmup, s.warmup_epochs
    found = Findings()
    if name == "multistep":
        ms = list(milestones)
        if ms != sorted(set(ms)) or any(m < 1 for m in ms):
            raise UserError(f"schedule.milestones = {ms!r} must be strictly increasing epochs >= 1")
    else:
        found.ignored["schedule.milestones"] = found.ignored["schedule.decay"] = f"only multistep uses it, not {name!r}"
    if name not in ("linear", "cosine", "sgdr", "triangle"):
        found.ignored["schedule.min_factor"] = f"only linear, cosine, sgdr and triangle use it, not {name!r}"
    if name != "sgdr":
        found.ignored["schedule.sgdr_t0"] = found.ignored["schedule.sgdr_t_mul"] = f"only sgdr uses it, not {name!r}"
    if name != "triangle":
        why = f"only triangle uses it, not {name!r}"
        found.ignored["schedule.triangle_start_factor"] = found.ignored["schedule.triangle_peak"] = why
    has_warmup = warmup != "none" and warmup_epochs > 0
    if warmup == "none":
        for key in ("warmup_epochs", "warmup_start_factor", "warmup_exponent"):
            found.ignored[f"schedule.{key}"] = "schedule.warmup = 'none'"
    elif warmup_epochs == 0:
        for key in ("warmup", "warmup_start_factor", "warmup_exponent"):
            found.ignored[f"schedule.{key}"] = "schedule.warmup_epochs = 0"
    elif warmup == "linear":
        found.ignored["schedule.warmup_exponent"] = "only exponential warmup uses it"

    main_epochs = epochs - (warmup_epochs if has_warmup else 0)
    if has_warmup and main_epochs <= 0:
        found.warnings.append(
            f"schedule.warmup_epochs = {warmup_epochs} is not shorter than train.epochs = {epochs}: the whole run is "
            "warmup and the lr never reaches optim.lr; lower schedule.warmup_epochs to change that"
        )
    elif name == "multistep":
        late = [m for m in milestones if m >= main_epochs]
        if late:
            where = f"the last epoch ({main_epochs}" + (" after warmup)" if has_warmup else ")")
            found.warnings.append(
                f"schedule.milestones {', '.join(map(str, late))} {'is' if len(late) == 1 else 'are'} at or after "
                f"{where}: the lr will not drop there; set schedule.milestones to change that"
            )
    elif name == "sgdr":
        periods = _sgdr_periods(s.sgdr_t0, s.sgdr_t_mul, main_epochs)
        if sum(periods) != main_epochs:
            start = sum(periods[:-1])
            found.warnings.append(
                f"the last SGDR period ({periods[-1]} epochs from epoch {start}) is cut short by the end of training "
                f"at epoch {main_epochs}: the lr will not reach its minimum; periods end at epochs "
                f"{', '.join(str(sum(periods[: i + 1])) for i in range(len(periods)))}"
            )
    return found


@dataclass(frozen=True)
class ScheduleCurve:
    """A checked schedule in optimizer steps; calling it gives the factor of one step."""

    name: str
    warmup: str
    warmup_steps: int  # Tw
    main_steps: int  # T (0 when warmup takes the whole run)
    boundaries: tuple[int, ...]  # multistep: milestones; sgdr: cycle starts (from 0); steps on the main clock
    period_ends: tuple[int, ...]  # sgdr: each cycle's end on the main clock (the last may lie past T)
    decay: float
    min_factor: float
    warmup_start_factor: float
    warmup_exponent: float
    triangle_start_factor: float = 0.2
    triangle_peak_step: int = 0  # P, on the main clock

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
        if self.name == "triangle":
            return self._triangle(t)
        # sgdr: the cycle whose (start, end] holds t; the first cycle also holds t = 0
        cycle = max(bisect.bisect_left(self.boundaries, t) - 1, 0)
        start = self.boundaries[cycle]
        return self._cosine(t - start, self.period_ends[cycle] - start)

    def _triangle(self, t: int) -> float:
        peak, end = self.triangle_peak_step, self.main_steps
        if t < peak:
            return self.triangle_start_factor + (1 - self.triangle_start_factor) * t / peak
        if end == peak:
            return 1.0
        return 1 + (self.min_factor - 1) * (t - peak) / (end - peak)

    def _cosine(self, t: int, period: int) -> float:
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * t / period)) / 2


EXTENDABLE = ("constant", "multistep", "sgdr")  # curves that do not depend on train.epochs


def check_extension(*, name: str, epochs: int, new_epochs: int, epochs_done: int) -> None:
    """Whether a run of `epochs` that has trained `epochs_done` can continue to `new_epochs`.

    Only where the lr of every step already taken stays what it was: constant, multistep (milestones are
    epochs) and SGDR (its periods do not depend on the end) do not depend on the run's length; linear and cosine
    stretch over the whole run, so a longer run would have taken other steps from the start.
    """
    if new_epochs < epochs_done:
        raise UserError(
            f"train.epochs = {new_epochs} is fewer than the {epochs_done} epochs the run has already trained"
        )
    if new_epochs != epochs and name not in EXTENDABLE:
        raise UserError(
            f"schedule.name = {name!r} spreads its curve over train.epochs, so training this run to {new_epochs} "
            f"instead of {epochs} epochs would change the lr of the steps it already took; continuing a run longer "
            f"works for {', '.join(EXTENDABLE)}; for {name!r}, start a new run with train.epochs = {new_epochs}"
        )


def schedule_curve(
    *,
    steps_per_epoch: int,
    epochs: int | float,
    name: str = "multistep",
    milestones: Sequence[int] = (80, 120),
    decay: float = 0.1,
    min_factor: float = 1e-3,
    sgdr_t0: int = 10,
    sgdr_t_mul: float = 1.0,
    triangle_start_factor: float = 0.2,
    triangle_peak: float = 0.23,
    warmup: str = "none",
    warmup_epochs: int = 0,
    warmup_start_factor: float = 1e-3,
    warmup_exponent: float = 4.0,
) -> ScheduleCurve:
    """The factor on the base lr per optimizer step; the reference definition (see the module docstring).

    `milestones`, `sgdr_t0` and `warmup_epochs` are in epochs; `steps_per_epoch` counts optimizer steps.
    """
    if steps_per_epoch < 1:
        raise UserError(f"steps_per_epoch = {steps_per_epoch} must be >= 1")
    settings = dict(locals())
    del settings["steps_per_epoch"]
    check_schedule(**settings)
    has_warmup = warmup != "none" and warmup_epochs > 0
    warmup_epochs = warmup_epochs if has_warmup else 0
    main_epochs = max(epochs - warmup_epochs, 0)
    main_steps = max(run_steps(steps_per_epoch, epochs) - warmup_epochs * steps_per_epoch, 0)
    boundaries: tuple[int, ...] = ()
    period_ends: tuple[int, ...] = ()
    if name == "multistep":
        boundaries = tuple(m * steps_per_epoch for m in milestones)
    elif name == "sgdr" and main_epochs > 0:
        periods = _sgdr_periods(sgdr_t0, sgdr_t_mul, main_epochs)
        boundaries = tuple(steps_per_epoch * sum(periods[:i]) for i in range(len(periods)))
        period_ends = tuple(steps_per_epoch * sum(periods[: i + 1]) for i in range(len(periods)))
    return ScheduleCurve(
        name=name,
        warmup=warmup if has_warmup else "none",
        warmup_steps=warmup_epochs * steps_per_epoch,
        main_steps=main_steps,
        boundaries=boundaries,
        period_ends=period_ends,
        decay=decay,
        min_factor=min_factor,
        warmup_start_factor=warmup_start_factor,
        warmup_exponent=warmup_exponent,
        triangle_start_factor=triangle_start_factor,
        triangle_peak_step=int(triangle_peak * main_steps),
    )


def create_scheduler(
    optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int | float, **schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving `schedule_curve(...)`; call its `step()` once after every optimizer step.

    `schedule` is the `[schedule]` section's keywords (`section_kwargs(recipe.schedule)`). On creation each
    group's lr is set to its base lr times the factor of step 0. The state dict holds the position
    (`last_epoch`) and the base learning rates only, not the schedule's settings, which come from the recipe
    on resume.
    """
    curve = schedule_curve(steps_per_epoch=steps_per_epoch, epochs=epochs, **schedule)

    # A plain function, not the curve object: LambdaLR would otherwise save the curve's fields in its state
    # dict and, on load, silently replace the recipe's schedule with the checkpoint's.
    def factor(step: int) -> float:
        return curve(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
