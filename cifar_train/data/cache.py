"""The decode cache: one file per decoded split, written atomically and read back memory-mapped.

`<cache_dir>/decoded/<key>.pt` holds a split's uint8 images, labels, per-image pixel sums, the rows left
out as corrupt and what was detected (columns, class names). The key is a hash of what determines the
contents: the local folder's path and file signature (or, for a Hub dataset, the split's `datasets`
fingerprint), the split, the columns as requested and `skip_corrupt`. Reading it is a memory map: instant,
and copy-on-write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cifar_train.atomic import write_atomic
from cifar_train.data.local import digest

__all__ = ["CACHE_FORMAT", "entry_path", "load_entry", "save_entry"]

CACHE_FORMAT = 3  # bump when the cached file layout or decoding changes (3: string labels, 16-bit images scaled)


def entry_path(cache_dir: Path, key_fields: list[Any]) -> Path:
    return Path(cache_dir) / "decoded" / f"{digest([CACHE_FORMAT, *key_fields])}.pt"


def load_entry(path: Path) -> dict[str, Any] | None:
    """A cache file's contents, memory-mapped; None when absent or unreadable (an unreadable one is removed)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        path.unlink(missing_ok=True)  # damaged, or written by another version: decode again
        return None


def save_entry(entry: dict[str, Any], path: Path) -> None:
    """Write next to the final name and rename into place: no half-written cache file, ever."""
    write_atomic(path, lambda temporary: torch.save(entry, temporary))
