"""Numbers as people read them: what the run writes for people (metrics, final metrics, evaluation results,
records, model cards) carries 6 significant digits, not float noise such as `88.20000457763672`.

Six significant digits are more than any of these numbers means (a top-1 over 10,000 images has 4; a time in
seconds is not repeatable to the millisecond), and rounding is monotonic, so the best of rounded values is the
rounded best. Files that a machine needs exactly (checkpoints) are not written through here.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SIGNIFICANT_DIGITS", "readable"]

SIGNIFICANT_DIGITS = 6


def readable(value: Any) -> Any:
    """`value` with every float (also inside dicts, lists and tuples) rounded to 6 significant digits."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {key: readable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(readable(item) for item in value)
    return value
