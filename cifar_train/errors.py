"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` is shown by the command-line tools as one line (exit status 2, no
traceback unless `--debug`). Its message must name the bad value and say what would be right.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UserError", "did_you_mean"]


class UserError(Exception):
    """Bad input: a recipe key, a value, a path, a dataset. The message is shown to the user as is."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
