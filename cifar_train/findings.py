"""What a check found that is not an error: settings with no effect, and warnings.

(Moves into `cifar_train.recipe` when the recipe rework lands; import it from there then.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Findings"]


@dataclass
class Findings:
    ignored: dict[str, str] = field(default_factory=dict)  # "section.key" -> why it has no effect
    warnings: list[str] = field(default_factory=list)
