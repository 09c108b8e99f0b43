"""The exceptions a user meets, the "did you mean" hint for their messages, and `guarded`, the one wrapper that
turns them into a line and an exit status for every command line.

Anything raised as `UserError` is shown by the command-line tools as one line (exit status 2, no
traceback unless `--debug`). Its message must name the bad value and say what would be right.
`NonFiniteLoss` (exit 3) and `Interrupted` (128 + the signal) end a training run on purpose.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from .wording import continue_command, speaking

__all__ = ["Interrupted", "NonFiniteLoss", "UserError", "did_you_mean", "guarded", "say_on_main"]


class UserError(Exception):
    """Bad input: a recipe key, a value, a path, a dataset. The message is shown to the user as is."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite with `train.nonfinite_loss = "stop"`; the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: during training (a checkpoint was saved) or while starting (nothing was written,
    `checkpoint` is None). `signum` says which."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint

    def describe(self) -> str:
        """One line: the signal, and the checkpoint to continue from or that the start-up left nothing behind."""
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"interrupted by {name} while starting, before training; nothing was written"
        run_dir = Path(self.checkpoint).parent.parent
        return f"interrupted by {name}; checkpoint {self.checkpoint}; continue with: {continue_command(run_dir)}"


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


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say_on_main(text: str) -> None:
    """Print to stderr, once per job: on the main process of a launch (RANK 0, or no launcher)."""
    if _is_main_process():
        print(text, file=sys.stderr)


def guarded(body: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command line's body; turn the exceptions a user meets into one line and an exit status.

    Messages raised inside speak the command line's language (`wording.speaking(interface="cli")`).
    """
    try:
        with speaking(interface="cli"):
            return body()
    except (UserError, NonFiniteLoss) as err:
        status = 2 if isinstance(err, UserError) else 3
        message = f"error: {' '.join(str(err).split())}"  # always one line
        shown = err
    except Interrupted as stop:
        status = 128 + stop.signum
        with speaking(interface="cli"):
            message = stop.describe()
        shown = stop
    except KeyboardInterrupt as interrupt:  # SIGINT outside the training loop (exporting, evaluating)
        status = 128 + signal.SIGINT
        message = "error: interrupted by SIGINT; a run directory keeps its newest complete checkpoint, if any"
        shown = interrupt
    if debug and _is_main_process():
        traceback.print_exception(shown)
    say_on_main(message)
    return status
