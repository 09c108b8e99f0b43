"""Atomic training checkpoints in a run directory's `checkpoints/` folder.

A checkpoint is what `accelerator.save_state` writes (model as safetensors, optimizer, RNG states,
all loaded back with `weights_only=True`) plus `train_state.json`: the loop's position (epoch, batch
within the epoch, optimizer step) and the lr scheduler's state, as JSON rather than pickle. It is
written into a temporary folder, marked complete, and renamed into place, so a checkpoint folder that
exists under its final name is whole; a damaged one is detected on load and the previous one is used.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .errors import UserError

__all__ = ["TrainState", "find_checkpoints", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "train_state.json"
COMPLETE_MARKER = "COMPLETE"
PREFIX = "step_"


@dataclass
class TrainState:
    """Where the loop is; enough to continue exactly from here."""

    epoch: int = 0  # current epoch (0-based); at an epoch's end this is the next epoch
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken
    skipped_steps: int = 0  # steps skipped for a non-finite loss (nonfinite_loss = "skip")
    elapsed_seconds: float = 0.0  # training time before this checkpoint
    best_val_acc1: float = 0.0
    epoch_loss_sum: float = 0.0  # this process's running train loss x images in the current epoch
    epoch_correct_sum: float = 0.0
    epoch_seen: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, keep: int) -> Path | None:
    """Save everything to `checkpoints/step_<global_step>` atomically; keep the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{PREFIX}{state.global_step:09d}_e{state.epoch:04d}_b{state.batch_in_epoch:06d}"
    tmp = folder / f".tmp_{final.name}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        for old in find_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(accelerator: Accelerator, run_dir: Path, log=print) -> TrainState:
    """Restore the newest loadable checkpoint; a damaged one is reported and the previous one tried."""
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(
            f"--resume {str(run_dir)!r}: no complete checkpoint in {str(Path(run_dir) / 'checkpoints')!r}; "
            "start the run again with --overwrite"
        )
    for checkpoint in reversed(checkpoints):
        try:
            state = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
            accelerator.load_state(str(checkpoint))
        except Exception as err:
            log(f"checkpoint {checkpoint.name} is damaged ({type(err).__name__}: {err}); trying the previous one")
            continue
        return state
    raise UserError(f"--resume {str(run_dir)!r}: every checkpoint is damaged; start the run again with --overwrite")
