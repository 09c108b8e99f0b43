"""The run directory, `runs/<name>/`: one owner for everything written there.

    recipe.toml  env.json  metrics.jsonl  final_metrics.json  checkpoints/  model.safetensors  config.json  README.md

`RunDirectory` refuses to clobber (only reads until every input is checked), takes an exclusive lock that the OS
releases even after `kill -9` and that the object releases exactly once (also on errors and signals), clears the
directory for `--overwrite`, writes the resolved recipe and the environment, appends one metrics line per epoch
(fsync'd; truncated back to the checkpoint on resume) and writes `final_metrics.json`. Exporting, the model
card and the Hub push build on it (`finish.py`); this module knows nothing of them. `read_metrics` is the one
reader of `metrics.jsonl` (the plots use it too).
"""

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic, write_text_atomic
from .errors import UserError
from .recipe import load_recipe, recipe_to_dict
from .rounding import readable
from .schema import Recipe

__all__ = [
    "CONFIG_FILE",
    "ENV_FILE",
    "EXPORT_FILES",
    "FINAL_FILE",
    "METRICS_FILE",
    "MODEL_CARD_FILE",
    "RECIPE_FILE",
    "WEIGHTS_FILE",
    "RunDirectory",
    "RunLock",
    "collect_env",
    "lock_holder",
    "read_metrics",
    "resumed_recipe",
]

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.toml"
ENV_FILE = "env.json"
FINAL_FILE = "final_metrics.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # timm's pretrained config
MODEL_CARD_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, MODEL_CARD_FILE)  # what local-dir: loads and a push uploads


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


def lock_holder(run_dir: Path) -> str | None:
    """Who holds `<run_dir>/.lock` ("pid N on HOST"), or None when nobody does. Creates nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
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
        since another run may have filled it after the first look.
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


def read_metrics(run_dir: str | os.PathLike, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The epoch records of a run's `metrics.jsonl` (a run directory or the file), in file order.

    A missing file gives []; a line that is not a JSON object with an `epoch` is a UserError naming it.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{str(path)!r} line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise UserError(f"{str(path)!r} line {number} has no 'epoch'; each line is one epoch's record")
        rows.append(row)
    return [row for row in rows if upto_epoch is None or row["epoch"] <= upto_epoch]


class RunDirectory:
    """`runs/<name>/` for one training run (see the module docstring).

    Construction only reads: it refuses a directory that holds a run (unless resuming or overwriting), one
    that another process holds, or a resume target without a recipe or checkpoint. `open()` is the first
    write; use the object as a context manager so the lock is released exactly once.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self._lock = RunLock(self.path)
        self._check()

    def _check(self) -> None:
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict: resume continues a run, overwrite starts it afresh")
        holder = lock_holder(self.path)
        if holder is not None:
            raise _in_use(self.path, holder)
        if self.resume:
            if not (self.path / RECIPE_FILE).is_file():
                raise UserError(f"--resume {str(self.path)!r}: not a run directory (no {RECIPE_FILE} in it)")
            from .checkpoint import find_checkpoints

            if not find_checkpoints(self.path):
                raise UserError(
                    f"--resume {str(self.path)!r}: no complete checkpoint in {str(self.path / 'checkpoints')!r} "
                    "(the run stopped before its first one); start it again with --overwrite"
                )
            return
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output directory {str(self.path)!r} exists and is a file; choose another --output-dir")
        if self.path.is_dir() and any(self.path.iterdir()) and not self.overwrite:
            raise _holds_a_run(self.path)

    @property
    def saved_recipe_path(self) -> Path:
        return self.path / RECIPE_FILE

    def open(self, *, main_process: bool, recipe_toml: str, env: dict[str, Any]) -> None:
        """Take the lock (main process), clear the directory for --overwrite, write recipe.toml and env.json.

        On resume nothing is written here; `truncate_metrics` forgets epochs after the checkpoint.
        """
        if not main_process:
            return
        self._lock.acquire(expect_empty=not (self.resume or self.overwrite))
        if self.overwrite:
            for entry in self.path.iterdir():
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if not self.resume:
            write_text_atomic(self.path / RECIPE_FILE, recipe_toml)
            write_json_atomic(self.path / ENV_FILE, env)

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- metrics log

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one epoch's record and fsync it, so a later kill cannot lose it."""
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(readable(row)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_metrics(self, upto_epoch: int) -> list[dict[str, Any]]:
        """Forget the epochs logged after a checkpoint (resume); returns the records kept."""
        rows = read_metrics(self.path, upto_epoch)
        write_text_atomic(self.path / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def env(self) -> dict[str, Any]:
        path = self.path / ENV_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    # ---- the end of a run

    def write_final(self, final: dict[str, Any]) -> None:
        """`final_metrics.json`: the last epoch, best top-1, training time (rounded for reading)."""
        write_json_atomic(self.path / FINAL_FILE, readable(final))


def resumed_recipe(recipe: Recipe | None, run_dir: Path) -> Recipe:
    """The run's own recipe.toml; a recipe given on the command line must equal it."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"--resume {str(run_dir)!r}: not a run directory (no recipe.toml in it)")
    saved = load_recipe(path, on_warning=lambda message: None)
    if recipe is not None and recipe != saved:
        a, b = recipe_to_dict(recipe), recipe_to_dict(saved)
        diffs = [f"{s}.{k}: {a[s][k]!r} here, {b[s][k]!r} in the run" for s in a for k in a[s] if a[s][k] != b[s][k]]
        raise UserError(
            f"--resume {str(run_dir)!r}: the recipe differs from the run's recipe.toml ({'; '.join(diffs)}); "
            "omit the recipe argument to continue with the saved one"
        )
    return saved


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


def collect_env(accelerator: Any, *, recipe_file: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Versions, devices, git commit, command line and the recipe it ran, for `env.json` and the model card."""
    import accelerate
    import datasets
    import timm
    import torch

    env: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "recipe_file": recipe_file,
        "overrides": list(overrides),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env
