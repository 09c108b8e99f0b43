"""Atomic file writes: a file is written next to its final name and renamed into place, never half-written.

Every writer of a run directory, the decode cache, an export or an evaluation report goes through
`write_atomic`, so a process killed mid-write leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["read_only_above", "write_atomic", "write_json_atomic", "write_text_atomic"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def read_only_above(path: str | os.PathLike) -> Path | None:
    """The folder that stops `path` from being written (itself or the nearest existing folder above it, when
    read-only: permissions or a read-only filesystem), or None when files can be made there."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        return existing
    return None


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(temporary_path)`, then rename the temporary file to `path` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
