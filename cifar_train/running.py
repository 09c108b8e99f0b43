"""The running metrics of an epoch, kept on the device and read to the host only at the loop's read points."""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator

__all__ = ["RunningMetrics"]


class RunningMetrics:
    """Running sums of one epoch on the device: loss x images and soft-correct images over the finite batches,
    images, non-finite batches, skipped steps, the longest run of skipped steps, and the first non-finite batch's
    optimizer step.

    `read()` is the one host read: the sums over every process as Python numbers.
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x images, correct, images
        # non-finite batches, skipped steps, longest run of consecutive skipped steps
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=device)  # optimizer step, 1-based
        self.skip_run = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps in a row, up to now

    def add(self, loss: torch.Tensor, correct: torch.Tensor, images: int, finite: torch.Tensor, step: int) -> None:
        """One batch. A non-finite batch is counted, and left out of the sums."""
        count = torch.full((), images, dtype=torch.float64, device=self.sums.device)  # a fill, not a host copy
        batch = torch.stack([loss.double() * images, correct.double(), count])
        self.sums.add_(torch.where(finite, batch, torch.zeros_like(batch)))
        bad = ~finite
        self.first_nonfinite.masked_fill_(bad & (self.first_nonfinite < 0), step)
        self.counts[0].add_(bad.long())

    def skipped(self, bad: torch.Tensor) -> None:
        """One optimizer step, skipped where `bad` (the same on every process)."""
        bad = bad.long()
        self.counts[1].add_(bad)
        self.skip_run.mul_(bad).add_(bad)
        self.counts[2].copy_(torch.maximum(self.counts[2], self.skip_run))

    def _over_processes(self, accelerator: Accelerator, extra: torch.Tensor) -> list[float]:
        """Everything over every process, in one host read: the sums, the non-finite batches and `extra` summed;
        skipped steps and their longest run as every process agreed them (each counts the same: taken once, not
        summed); the first non-finite step, the earliest."""
        summed = torch.cat([self.sums, self.counts[:1].double(), extra])
        first = self.first_nonfinite.double()
        first = torch.where(first > 0, first, math.inf)
        agreed = torch.stack([self.counts[1].double(), self.counts[2].double(), first])
        if accelerator.num_processes > 1:
            summed = accelerator.reduce(summed, reduction="sum")
            gathered = accelerator.gather(agreed[None])
            agreed = torch.cat([gathered[:, :2].max(dim=0).values, gathered[:, 2].min()[None]])
        return torch.cat([summed, agreed]).tolist()  # the host read

    def read(self, accelerator: Accelerator, *flags: bool) -> tuple[dict[str, Any], list[bool]]:
        """The sums over all processes, and `flags` OR-ed over processes (a stop request), in one read."""
        extra = torch.tensor([float(f) for f in flags], dtype=torch.float64).to(self.sums.device, non_blocking=True)
        values = self._over_processes(accelerator, extra)
        loss, correct, images, nonfinite = values[:4]
        skipped, run, first_step = values[-3:]
        summary = {
            "loss": loss / images if images else float("nan"),
            "acc1": 100.0 * correct / images if images else 0.0,
            "images": int(images),
            "nonfinite": int(nonfinite),
            "skipped": int(skipped),
            "skipped_run": int(run),
            "first_nonfinite": int(first_step) if math.isfinite(first_step) else None,
        }
        return summary, [v > 0 for v in values[4:-3]]

    def state_dict(self, accelerator: Accelerator) -> dict[str, Any]:
        """The epoch's numbers over every process (a collective: every process calls it), so that a run resumed on
        any number of processes continues them: the first process loads the totals, the others start at zero."""
        loss, correct, images, nonfinite, skipped, run, first = self._over_processes(
            accelerator, self.sums.new_zeros(0)
        )
        return {
            "sums": [loss, correct, images],
            "counts": [int(nonfinite), int(skipped), int(run)],
            "first": int(first) if math.isfinite(first) else -1,
            "skip_run": int(self.skip_run),  # the same on every process
        }

    def load_state_dict(self, state: dict[str, Any], *, main_process: bool = True) -> None:
        """The checkpoint's totals on the first process, zero elsewhere (see `state_dict`); the current run of
        skipped steps on every process, which each continues."""
        self.reset()
        self.skip_run.fill_(state.get("skip_run", 0))
        if main_process:
            counts = [*state["counts"], 0][:3]  # checkpoints written before the longest run was kept have two
            self.sums.copy_(torch.tensor(state["sums"], dtype=torch.float64))
            self.counts.copy_(torch.tensor(counts, dtype=torch.int64))
            self.first_nonfinite.fill_(state["first"])

    def reset(self) -> None:
        """A new epoch (a run of skipped steps goes on across it)."""
        self.sums.zero_()
        self.counts.zero_()
        self.first_nonfinite.fill_(-1)
