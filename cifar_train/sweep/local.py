"""The local executor: the runs on this machine, one after another, or one per visible GPU side by side.

Each run is `train_accelerate.py` in a process of its own (under `accelerate launch` when there is a GPU, plain
`python` on a CPU), its output appended to `<run dir>.log` (and shown, when runs go one at a time). A run that
fails is reported with its log and the others go on; Ctrl-C asks every running run to checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .plan import Run

__all__ = ["LAUNCHERS", "Failure", "Interrupted", "launch_prefix", "run_locally", "visible_gpus"]

LAUNCHERS = ("auto", "python", "accelerate")


@dataclass(frozen=True)
class Failure:
    """A run that ended without finishing: its exit status and where to look."""

    run: Run
    status: int
    detail: str = ""

    def __str__(self) -> str:
        why = f"exit status {self.status}" + (f", {self.detail}" if self.detail else "")
        return f"{self.run.run_dir.name} failed ({why}); run directory {self.run.run_dir}, log {self.run.log}"


class Interrupted(Exception):
    """The sweep was interrupted (Ctrl-C); the runs keep their checkpoints."""


def launch_prefix(launcher: str, processes: int | None = None) -> list[str]:
    """The command up to the script: `python`, or `accelerate launch --num_processes P` ("accelerate", or a run
    pinned to P > 1 processes)."""
    processes = processes or 1
    if launcher == "accelerate" or processes > 1:
        many = ["--multi_gpu"] if processes > 1 else []
        return [sys.executable, "-m", "accelerate.commands.launch", *many, "--num_processes", str(processes)]
    return [sys.executable]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (torch asked in a subprocess)."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        count = int(done.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        count = 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed is not None else []
    return (ids or [str(i) for i in range(count)])[:count]


class _Process:
    """One run's training process; its output is appended to the run's log (and shown, with `tee`)."""

    def __init__(self, run: Run, command: list[str], gpu: str | None, *, tee: bool) -> None:
        self.run, self.tee = run, tee
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(run.log, "a", encoding="utf-8")  # noqa: SIM115  (closed in wait())
        self.log.write(f"=== {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(command)}\n")
        self.log.flush()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE if tee else self.log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            start_new_session=not tee,  # side by side: a process group of its own, stopped by us, not the terminal
        )

    def wait(self) -> int:
        if self.tee:
            for line in self.process.stdout:
                sys.stdout.write(line)
                self.log.write(line)
        status = self.process.wait()
        self.log.close()
        return status

    def stop(self, signum: int) -> None:
        """Ask the run to stop; it checkpoints on SIGINT/SIGTERM, so the next sweep continues it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)


def _status(status: int) -> int:
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell reports it


def _one_after_another(work: list[tuple[Run, list[str]]], gpu: str | None) -> list[Failure]:
    failures = []
    for run, command in work:
        process = _Process(run, command, gpu, tee=True)
        try:
            status = process.wait()
        except KeyboardInterrupt:  # the run got the terminal's SIGINT too: let it write its checkpoint
            process.wait()
            raise Interrupted() from None
        if status != 0:
            failures.append(Failure(run, _status(status)))
            print(f"{run.run_dir.name}: failed (exit status {_status(status)}; log {run.log})", flush=True)
        else:
            print(f"{run.run_dir.name}: done ({run.run_dir})", flush=True)
    return failures


def _side_by_side(work: list[tuple[Run, list[str]]], gpus: list[str]) -> list[Failure]:
    queue, running, failures = list(work), {}, []
    try:
        while queue or running:
            for gpu in [g for g in gpus if g not in running]:
                if queue:
                    run, command = queue.pop(0)
                    print(f"{run.run_dir.name}: running on GPU {gpu} (log {run.log})", flush=True)
                    running[gpu] = _Process(run, command, gpu, tee=False)
            time.sleep(0.5)
            for gpu, process in list(running.items()):
                if process.process.poll() is None:
                    continue
                status = process.wait()
                del running[gpu]
                if status != 0:
                    failures.append(Failure(process.run, _status(status)))
                    print(f"{process.run.run_dir.name}: failed on GPU {gpu} (log {process.run.log})", flush=True)
                else:
                    print(f"{process.run.run_dir.name}: done on GPU {gpu} ({process.run.run_dir})", flush=True)
    except KeyboardInterrupt:
        for process in running.values():
            process.stop(signal.SIGINT)
            process.wait()
        raise Interrupted() from None
    return failures


def run_locally(work: Sequence[tuple[Run, list[str]]], gpus: list[str]) -> list[Failure]:
    """Run each (run, command): one per GPU side by side when there are several GPUs and every run takes one
    process, else one after another. Returns the runs that failed."""
    if len(gpus) > 1 and all((run.processes or 1) == 1 for run, _ in work):
        return _side_by_side(list(work), gpus)
    return _one_after_another(list(work), gpus[0] if len(gpus) == 1 else None)
