"""Atomic training checkpoints in a run directory's `checkpoints/` folder.

A checkpoint is what `accelerator.save_state` writes (model as safetensors, optimizer, RNG states,
all loaded back with `weights_only=True`) plus `train_state.json`: the loop's position (epoch, batch
within the epoch, optimizer step) and the lr scheduler's state, as JSON rather than pickle, and, when the loop
keeps tensors of its own (Lookahead's slow weights), `loop_tensors.safetensors`. It is
written into a temporary folder, sealed with a `COMPLETE` manifest (size and SHA-256 of every file), and
renamed into place, so a checkpoint folder that exists under its final name was whole when written. On
load every file is checked against the manifest (a truncated or altered file is caught here, including
the RNG states, which Accelerate would otherwise skip silently); a damaged checkpoint is reported and
the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from .errors import UserError
from .wording import option

__all__ = [
    "TrainState",
    "checkpoint_problem",
    "checkpointer",
    "find_checkpoints",
    "load_checkpoint",
    "newest_state",
    "save_checkpoint",
    "seal",
    "start_state",
]

STATE_FILE = "train_state.json"
TENSORS_FILE = "loop_tensors.safetensors"  # the loop's own tensors (Lookahead's slow weights), from the main process
COMPLETE_MARKER = "COMPLETE"  # JSON manifest {"files": {name: {"bytes": n, "sha256": hex}}}
PREFIX = "step_"
TMP_PREFIX = ".tmp_"
_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing


@dataclass
class TrainState:
    """Where the loop is; enough to continue exactly from here."""

    epoch: int = 0  # current epoch (0-based); at an epoch's end this is the next epoch
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken
    skipped_steps: int = 0  # steps skipped for a non-finite loss (nonfinite_loss = "skip")
    elapsed_seconds: float = 0.0  # training time before this checkpoint
    best_val_acc1: float = 0.0
    running: dict[str, Any] = field(default_factory=dict)  # `RunningMetrics` of the current epoch, all processes
    scheduler: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)  # what the model's outputs mean, in order
    num_processes: int = 0  # processes that trained up to here (0: not recorded; the RNG files tell)


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, state: TrainState, keep: int, tensors: dict[str, Any] | None = None
) -> Path | None:
    """Save everything to `checkpoints/step_<global_step>` atomically; keep the newest `keep`. `tensors` (the main
    process's) go to `loop_tensors.safetensors`."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{PREFIX}{state.global_step:09d}_e{state.epoch:04d}_b{state.batch_in_epoch:06d}"
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{TMP_PREFIX}*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        if tensors:
            from safetensors.torch import save_file

            save_file({name: value.detach().cpu().contiguous() for name, value in tensors.items()}, tmp / TENSORS_FILE)
        seal(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        for old in find_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def seal(folder: Path) -> None:
    """Write the `COMPLETE` manifest of every file now in `folder` (the last write of a checkpoint)."""
    text = json.dumps({"files": _manifest(Path(folder))}, indent=1) + "\n"
    (Path(folder) / COMPLETE_MARKER).write_text(text)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder's files (missing, truncated, altered), or None when whole."""
    try:
        recorded = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE_MARKER} manifest is unreadable"
    for name, expected in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 recorded at save time"
    return None


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


def load_checkpoint(
    accelerator: Accelerator, run_dir: Path, log=print, tensors_into: Callable[[dict[str, Any]], None] | None = None
) -> TrainState:
    """Restore the newest loadable checkpoint; a damaged one is reported and the previous one tried.

    `tensors_into` receives the checkpoint's `loop_tensors.safetensors` (on this process's device); a checkpoint
    without that file cannot restore such a run and counts as damaged."""
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(
            f"{option('resume', run_dir)}: no complete checkpoint in {str(Path(run_dir) / 'checkpoints')!r}; "
            f"start the run again with {option('overwrite')}"
        )
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            try:
                state = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
                state.num_processes = _saved_processes(checkpoint)
                if accelerator.process_index < state.num_processes:  # a process beyond them has no RNG file
                    _check_rng_file(checkpoint, accelerator.process_index)
                accelerator.load_state(str(checkpoint))
                if tensors_into is not None:
                    from safetensors.torch import load_file

                    tensors_into(load_file(checkpoint / TENSORS_FILE, device=str(accelerator.device)))
            except Exception as err:  # anything unreadable, including a pickle that weights_only refuses
                problem = f"{type(err).__name__}: {_first_line(err)}"
        if problem is not None:
            log(f"checkpoint {checkpoint.name} is damaged ({problem}); trying the previous one")
            continue
        if checkpoint != checkpoints[-1]:
            log(f"using checkpoint {checkpoint.name}")
        return state
    raise UserError(
        f"{option('resume', run_dir)}: every checkpoint is damaged (see above); start the run again with "
        f"{option('overwrite')}"
    )


def _saved_processes(checkpoint: Path) -> int:
    """How many processes wrote the checkpoint: Accelerate saves one RNG file per process."""
    return len(list(checkpoint.glob("random_states_*.pkl")))


def newest_state(run_dir: Path) -> TrainState | None:
    """The loop state of the run's newest readable checkpoint, read without loading it (None when there is none)."""
    for checkpoint in reversed(find_checkpoints(run_dir)):
        try:
            return TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            continue  # damaged: load_checkpoint reports it
    return None


def _check_rng_file(checkpoint: Path, process_index: int) -> None:
    """Read this process's RNG states the way Accelerate will; it swallows a failure there, we do not."""
    from accelerate.utils import load

    load(checkpoint / f"random_states_{process_index}.pkl")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------------
# The loop's side: what goes into a checkpoint, and the state a run starts (or resumes) from


def checkpointer(accelerator, run, step, scheduler, classes, *, keep: int) -> Callable[[TrainState], Path | None]:
    """The loop's `save(state)`: the scheduler, running sums and lookahead go into the state, then to disk."""

    def save(state: TrainState) -> Path | None:
        state.scheduler = scheduler.state_dict()
        state.running = step.metrics.state_dict(accelerator)  # every process's sums together
        state.class_names, state.num_processes = list(classes), accelerator.num_processes
        tensors = step.lookahead.state_dict() if step.lookahead is not None else None
        return save_checkpoint(accelerator, run.path, state, keep=keep, tensors=tensors)

    return save


def start_state(
    accelerator, run, step, scheduler, resume: bool, say, *, seed: int, order_kept: bool = True
) -> tuple[TrainState, list[dict[str, Any]]]:
    """A fresh state, or the newest loadable checkpoint's (metrics after it are forgotten).

    A checkpoint written by another number of processes continues with the same data order (a global batch
    holds the same images however many processes share it) but with new random streams for augmentation and
    dropout: there is no saved stream for a process that did not exist, so no process keeps its old one.
    `order_kept` is False where the data order itself depends on the number of processes (`data.streaming_source`).
    """
    if not resume:
        return TrainState(), []
    into = step.lookahead.load_state_dict if step.lookahead is not None else None
    state = load_checkpoint(accelerator, run.path, log=say, tensors_into=into)
    scheduler.load_state_dict(state.scheduler)
    if state.running:
        step.metrics.load_state_dict(state.running, main_process=accelerator.is_main_process)
    history = run.truncate_metrics(state.epoch) if accelerator.is_main_process else []
    say(f"resuming {run.path} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}, step {state.global_step}")
    if state.num_processes != accelerator.num_processes:
        order = (
            "the data order continues exactly, but"
            if order_kept
            else "the data order from here on is that of this number of processes (data.streaming_source reads each "
            "epoch in the layout of its processes), and"
        )
        say(
            f"warning: the checkpoint was written by {state.num_processes} process(es), this run has "
            f"{accelerator.num_processes}: {order} the augmentation and dropout random "
            "streams start afresh, so the result is no longer bit-exact with an uninterrupted run"
        )
        set_seed((seed * 1_000_003 + state.global_step * 1_009 + accelerator.process_index) % 2**32)
    return state, history
