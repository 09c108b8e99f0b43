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


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions that turn `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close.

    difflib finds the similar choices; among them the fewest edits wins ('resnet21' -> 'resnet20', not
    'resnet32', which difflib alone ranks the same), then the earlier in `choices`.
    """
    choices = list(choices)
    order = {choice: index for index, choice in reversed(list(enumerate(choices)))}
    close = difflib.get_close_matches(word, choices, n=10, cutoff=0.6)
    if not close:
        return ""
    best = min(close, key=lambda choice: (_edits(word, choice), order[choice]))
    return f" (did you mean {best!r}?)"
