"""The run directory: refusing to clobber, a lock against two writers, and the environment record."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["RunLock", "check_output_dir", "collect_env", "lock_holder", "write_text_atomic"]

LOCK_FILE = ".lock"


def _in_use(run_dir: Path, holder: str) -> UserError:
    return UserError(
        f"run directory {str(run_dir)!r} is in use by {holder}; wait for that run to finish (or stop it) "
        "or choose another --output-dir"
    )


def _holds_a_run(run_dir: Path) -> UserError:
    return UserError(
        f"output directory {str(run_dir)!r} already holds a run; pass --resume {run_dir} to continue it, "
        "--overwrite to replace it, or choose another --output-dir"
    )


def check_output_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory that already holds something, unless resuming or overwriting.

    Only reads: a refused directory is left exactly as it was.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict: resume continues a run, overwrite starts it afresh")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)
    if resume:
        if not (run_dir / "recipe.toml").is_file():
            raise UserError(f"--resume {str(run_dir)!r}: not a run directory (no recipe.toml in it)")
        from .checkpoint import find_checkpoints

        if not find_checkpoints(run_dir):
            raise UserError(
                f"--resume {str(run_dir)!r}: no complete checkpoint in {str(run_dir / 'checkpoints')!r} (the run "
                "stopped before its first one); start it again with --overwrite"
            )
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output directory {str(run_dir)!r} exists and is a file; choose another --output-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise _holds_a_run(run_dir)


def lock_holder(run_dir: Path) -> str | None:
    """Who holds `<run_dir>/.lock` ("pid N on HOST"), or None when nobody does. Creates nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive `flock` on `<run_dir>/.lock`; released by the OS even if the process is killed."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, expect_empty: bool = False) -> None:
        """Take the lock or raise `UserError` naming its holder.

        `expect_empty` (a fresh run): the directory must still hold nothing, re-checked under the lock,
        since another run may have filled it after `check_output_dir` looked.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise _in_use(self.path.parent, holder) from None
        if expect_empty and any(entry.name != LOCK_FILE for entry in self.path.parent.iterdir()):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise _holds_a_run(self.path.parent)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def clear_run_dir(self) -> None:
        """For --overwrite: remove everything but the lock we hold."""
        for entry in self.path.parent.iterdir():
            if entry.name == LOCK_FILE:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def collect_env(*, device: str, num_processes: int, mixed_precision: str) -> dict[str, Any]:
    """Versions, devices, git commit and command line, for `env.json` and the model card."""
    import accelerate
    import datasets
    import timm
    import torch

    env: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "device": device,
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def dump_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
