"""How a message names what the user can change, in the language of the entry point the user came through.

The same check serves several interfaces: `train_accelerate.py` (flags and recipe keys), `evaluate.py` (its own
flags), and the Python API (`train(..., resume=True)`, `evaluate(..., split="test")`). A message that tells the
user what to do asks this module for the words, so a notebook user is told `resume=True`, an `evaluate.py` user
`--split`, and nobody is told about a flag or a key that their interface does not have. The entry points say who
is speaking (`speaking(...)`); everything else only asks.

This is the bottom layer of `cifar_train`: it imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, replace

__all__ = [
    "Voice",
    "continue_command",
    "current",
    "option",
    "override",
    "setting",
    "setting_fix",
    "speaking",
]

INTERFACES = ("python", "cli")
COMMANDS = ("train", "evaluate")


@dataclass(frozen=True)
class Voice:
    interface: str = "python"  # "python" (the API) or "cli" (a command line)
    command: str = "train"  # "train" or "evaluate"


_VOICE: contextvars.ContextVar[Voice | None] = contextvars.ContextVar("cifar_recipes_voice", default=None)


def current() -> Voice:
    """Who is speaking now; the Python API for training unless an entry point said otherwise."""
    return _VOICE.get() or Voice()


@contextlib.contextmanager
def speaking(*, interface: str | None = None, command: str | None = None) -> Iterator[Voice]:
    """Messages raised inside speak as `interface` ("python" / "cli") for `command` ("train" / "evaluate").

    Unset parts keep what an outer entry point said: `evaluate.py` says "cli", the `evaluate()` it calls says
    "evaluate", and together they are evaluate.py's own words.
    """
    if interface is not None and interface not in INTERFACES:
        raise ValueError(f"interface={interface!r}; choose one of {INTERFACES}")
    if command is not None and command not in COMMANDS:
        raise ValueError(f"command={command!r}; choose one of {COMMANDS}")
    voice = replace(current(), **{k: v for k, v in (("interface", interface), ("command", command)) if v is not None})
    token = _VOICE.set(voice)
    try:
        yield voice
    finally:
        _VOICE.reset(token)


# The options of the training entry points: (command line, Python API). `{}` takes the value.
_TRAIN_OPTIONS = {
    "resume": ("--resume {}", "resume=True"),
    "overwrite": ("--overwrite", "overwrite=True"),
    "output_dir": ("--output-dir", "output_dir"),
}
# The options of evaluation: (evaluate.py, evaluate()).
_EVALUATE_OPTIONS = {
    "tta": ("--tta {}", 'tta="{}"'),
    "split": ("--split", "split"),
    "dataset": ("--dataset", "dataset"),
    "batch_size": ("--batch-size", "batch_size"),
    "num_workers": ("--num-workers", "num_workers"),
    "image_column": ("--image-column", "image_column"),
    "label_column": ("--label-column", "label_column"),
    "out_dir": ("--out-dir", "out_dir"),
}
# Recipe keys that evaluation takes as its own options; the others it cannot set.
_EVALUATE_SETTINGS = {
    "data.dataset": "dataset",
    "data.val_split": "split",
    "data.train_split": "split",
    "data.image_column": "image_column",
    "data.label_column": "label_column",
}


def option(name: str, value: object = "") -> str:
    """An option of the current entry point, e.g. `option("resume", "runs/x")` -> `--resume runs/x` or
    `resume=True`; `option("tta", "flip")` -> `--tta flip` or `tta="flip"`."""
    voice = current()
    table = _EVALUATE_OPTIONS if name in _EVALUATE_OPTIONS else _TRAIN_OPTIONS
    cli, python = table[name]
    return (cli if voice.interface == "cli" else python).format(value)


def setting(key: str) -> str:
    """A recipe key (`data.val_split`) as the current entry point lets the user set it: the key itself when
    training, `--split` for evaluate.py, `split` for `evaluate()`. A key evaluation has no option for stays a
    recipe key (it names the run's recipe)."""
    if current().command == "evaluate" and key in _EVALUATE_SETTINGS:
        return option(_EVALUATE_SETTINGS[key])
    return key


def setting_fix(key: str, value: str) -> str:
    """'set KEY = VALUE' where the current entry point can set it (training), else '' (no advice it can't take)."""
    if current().command == "evaluate" and key not in _EVALUATE_SETTINGS:
        return ""
    if current().command == "evaluate":
        return f"pass {setting(key)} {value}" if current().interface == "cli" else f"pass {setting(key)}={value}"
    return f"set {key} = {value}"


def override(item: str) -> str:
    """How a recipe override was given: `--set train.epochs=3` on the command line, an override string in Python."""
    return f"--set {item!r}" if current().interface == "cli" else f"override {item!r}"


def continue_command(run_dir: object) -> str:
    """What continues an interrupted run, in the current interface."""
    if current().interface == "cli":
        return f"python train_accelerate.py --resume {run_dir}"
    return f"train(None, {str(run_dir)!r}, resume=True)"
