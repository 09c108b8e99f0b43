"""The exceptions a user meets, and the "did you mean" hint for their messages.

Anything raised as `UserError` is shown by the command-line tools as one line (exit status 2, no
traceback unless `--debug`). Its message must name the bad value and say what would be right.
`NonFiniteLoss` (exit 3) and `Interrupted` (128 + the signal) end a training run on purpose.
"""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Interrupted", "NonFiniteLoss", "UserError", "did_you_mean"]


class UserError(Exception):
    """Bad input: a recipe key, a value, a path, a dataset. The message is shown to the user as is."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite with `train.nonfinite_loss = "stop"`; the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during training; a checkpoint was saved. `signum` says which."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
