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

import contextlib
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

from .atomic import read_only_above, write_json_atomic, write_text_atomic
from .errors import UserError
from .recipe import load_recipe, recipe_to_dict
from .rounding import readable
from .schema import Recipe
from .wording import option

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
        f"or choose another {option('output_dir')}"
    )


def _holds_a_run(run_dir: Path) -> UserError:
    return UserError(
        f"output directory {str(run_dir)!r} already holds a run; pass {option('resume', run_dir)} to continue it, "
        f"{option('overwrite')} to replace it, or choose another {option('output_dir')}"
    )


def _check_writable(path: Path) -> None:
    """The run directory, or the nearest folder above it that exists, must take new files (not read-only)."""
    blocked = read_only_above(path)
    if blocked is not None:
        raise UserError(
            f"output directory {str(path)!r} cannot be written ({str(blocked)!r} is read-only); "
            f"choose another {option('output_dir')}"
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
        self._opened = False  # open() wrote here (main process)
        self._created = False  # open() made the directory
        self._check()

    def _check(self) -> None:
        if self.resume and self.overwrite:
            raise UserError(
                f"{option('resume', self.path)} and {option('overwrite')} contradict: resume continues a run, "
                "overwrite starts it afresh"
            )
        holder = lock_holder(self.path)
        if holder is not None:
            raise _in_use(self.path, holder)
        if self.resume:
            resume = option("resume", self.path)
            if not (self.path / RECIPE_FILE).is_file():
                raise UserError(f"{resume}: {str(self.path)!r} is not a run directory (no {RECIPE_FILE} in it)")
            from .checkpoint import find_checkpoints

            if not find_checkpoints(self.path):
                raise UserError(
                    f"{resume}: no complete checkpoint in {str(self.path / 'checkpoints')!r} (the run stopped before "
                    f"its first one); start it again with {option('overwrite')}"
                )
            return
        _check_writable(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(
                f"output directory {str(self.path)!r} exists and is a file; choose another {option('output_dir')}"
            )
        if self.path.is_dir() and any(self.path.iterdir()) and not self.overwrite:
            raise _holds_a_run(self.path)

    @property
    def saved_recipe_path(self) -> Path:
        return self.path / RECIPE_FILE

    def open(self, *, main_process: bool, recipe_toml: str, env: dict[str, Any]) -> None:
        """Take the lock (main process), clear the directory for --overwrite, write recipe.toml and env.json.

        On resume nothing is written here unless the recipe changed (a run trained longer: `resumed_recipe`
        allowed only `train.epochs` to change), when recipe.toml takes the new one and env.json adds the command;
        `truncate_metrics` forgets epochs after the checkpoint.
        """
        if not main_process:
            return
        self._created = not self.path.exists()
        self._lock.acquire(expect_empty=not (self.resume or self.overwrite))
        if self.overwrite:
            for entry in self.path.iterdir():
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if not self.resume:
            write_text_atomic(self.path / RECIPE_FILE, recipe_toml)
            write_json_atomic(self.path / ENV_FILE, env)
        elif recipe_toml != (self.path / RECIPE_FILE).read_text(encoding="utf-8"):
            self._continue_with(recipe_toml, env)
        self._opened = True

    def _continue_with(self, recipe_toml: str, env: dict[str, Any]) -> None:
        """The run goes on with a changed recipe (more epochs): recipe.toml is the new one, and env.json's
        overrides say how to rebuild it from the recipe file (the new ones replace the same keys), so a record
        of the run names the command that gives its recipe."""
        saved = self.env()
        new_keys = {item.split("=", 1)[0].strip() for item in env.get("overrides", [])}
        kept = [item for item in saved.get("overrides", []) if item.split("=", 1)[0].strip() not in new_keys]
        saved["overrides"] = [*kept, *env.get("overrides", [])]
        saved.setdefault("continued", []).append({key: env.get(key) for key in ("started", "command", "overrides")})
        write_text_atomic(self.path / RECIPE_FILE, recipe_toml)
        write_json_atomic(self.path / ENV_FILE, saved)

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is not None and self._opened and not self.resume and not (self.path / METRICS_FILE).exists():
            self._abandon()
        self.close()

    def _abandon(self) -> None:
        """A fresh run that ended before its first epoch was logged leaves no half-made run directory: what it
        wrote goes (and the directory, if it made it), so the same command can simply be run again."""
        for entry in self.path.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()

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
    """The recipe a resumed run continues with: its own recipe.toml, or `recipe` when it differs from it only in
    `train.epochs` (training a run longer, where the schedule allows it: `schedule.check_extension`)."""
    from .checkpoint import newest_state
    from .schedule import check_extension

    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{option('resume', run_dir)}: {str(run_dir)!r} is not a run directory (no recipe.toml in it)")
    saved = load_recipe(path, on_warning=lambda message: None)
    if recipe is None or recipe == saved:
        return saved
    a, b = recipe_to_dict(recipe), recipe_to_dict(saved)
    diffs = {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}
    others = {key: values for key, values in diffs.items() if key != "train.epochs"}
    if others:
        shown = "; ".join(f"{key}: {here!r} here, {there!r} in the run" for key, (here, there) in others.items())
        raise UserError(
            f"{option('resume', run_dir)}: the recipe differs from the run's recipe.toml ({shown}); only train.epochs "
            "may change when continuing a run (to train it longer); start a new run for anything else"
        )
    state = newest_state(Path(run_dir))
    done = state.epoch if state is not None else 0
    check_extension(
        name=saved.schedule.name, epochs=saved.train.epochs, new_epochs=recipe.train.epochs, epochs_done=done
    )
    return recipe


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
