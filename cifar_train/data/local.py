"""A local dataset folder, looked at with one `os.scandir` walk: its signature, layout and imagefolder listing.

The walk is cheap (60,000 files in well under a second) and reads no image, so it serves three jobs:

* the **signature** (names, sizes, modification times) keys the decode cache, so a warm start finds its
  decoded tensors without opening the dataset through `datasets` at all;
* the **layout** (`save_to_disk`, `parquet`, `imagefolder`, raw MNIST `idx` files) says how to open it;
* the **imagefolder listing** (`<split>/<class>/<image>` or `<class>/<image>`), which we read ourselves: on
  a 60,000-image folder `datasets.load_dataset` spends 70-90 s resolving its glob patterns over every file
  on every load (measured on 2 cores), while the listing here is already in hand. Anything that does
  not fit that shape exactly (metadata files, uneven depth, unknown split names) goes to `datasets`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "FolderScan", "ImageFolderListing", "digest", "scan_folder"]

IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tif", ".tiff", ".webp"}
)
# Folder names `datasets` maps to a split (its `SPLIT_KEYWORDS`), exactly as it names the split.
_SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
_IDX_FILE = re.compile(r".*-idx\d-ubyte(\.gz)?$")
_METADATA_FILE = re.compile(r"metadata\.(csv|jsonl|json|parquet)$")
_DATA_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")


def digest(fields: object) -> str:
    """A short stable hash of JSON-serialisable `fields`."""
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ImageFolderListing:
    """An imagefolder, listed: per split its image paths (sorted) and label indices into `class_names`."""

    class_names: list[str]
    files: dict[str, list[str]]  # split -> absolute paths
    labels: dict[str, list[int]]  # split -> label index per file


@dataclass(frozen=True)
class FolderScan:
    """Every visible file under a folder: relative path (with '/'), size in bytes, modification time in ns."""

    root: Path
    entries: tuple[tuple[str, int, int], ...]

    @cached_property
    def signature(self) -> str:
        """Changes whenever a file is added, removed, resized or rewritten."""
        listing = "\n".join(f"{name}\t{size}\t{mtime}" for name, size, mtime in self.entries)
        return hashlib.sha256(listing.encode()).hexdigest()[:32]

    @cached_property
    def layout(self) -> str:
        """`save_to_disk`, `parquet`, `imagefolder`, `idx` (raw MNIST files) or `unknown`."""
        names = {name for name, _, _ in self.entries}
        if "dataset_dict.json" in names or "state.json" in names:
            return "save_to_disk"
        if any(name.endswith(_DATA_EXTENSIONS) and not _METADATA_FILE.search(name) for name in names):
            return "parquet" if any(name.endswith(".parquet") for name in names) else "data files"
        if self.image_files:
            return "imagefolder"
        if self.idx_files:
            return "idx"
        return "unknown"

    @cached_property
    def image_files(self) -> list[str]:
        return [name for name, _, _ in self.entries if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]

    @cached_property
    def idx_files(self) -> list[str]:
        return [name for name, _, _ in self.entries if _IDX_FILE.match(name.rsplit("/", 1)[-1])]

    @cached_property
    def imagefolder(self) -> ImageFolderListing | None:
        """The listing when the folder is exactly `<split>/<class>/<image>` or `<class>/<image>`, else None."""
        if self.layout != "imagefolder" or any(_METADATA_FILE.search(name) for name, _, _ in self.entries):
            return None
        parts = [name.split("/") for name in self.image_files]
        depths = {len(part) for part in parts}
        if depths == {3} and all(part[0] in _SPLIT_FOLDERS for part in parts):
            keyed = [(_SPLIT_FOLDERS[part[0]], part[1], "/".join(part)) for part in parts]
        elif depths == {2} and not any(part[0] in _SPLIT_FOLDERS for part in parts):
            keyed = [("train", part[0], "/".join(part)) for part in parts]
        else:
            return None
        class_names = sorted({label for _, label, _ in keyed})
        index = {name: position for position, name in enumerate(class_names)}
        files: dict[str, list[str]] = {}
        labels: dict[str, list[int]] = {}
        root = str(self.root)
        for split, label, name in sorted(keyed):
            files.setdefault(split, []).append(f"{root}/{name}")
            labels.setdefault(split, []).append(index[label])
        return ImageFolderListing(class_names, files, labels)


def scan_folder(root: Path) -> FolderScan:
    """Walk `root` (hidden files and folders left out); entries sorted by path, so the signature is stable."""
    entries: list[tuple[str, int, int]] = []
    pending = [("", str(root))]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as found:
            for entry in found:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append((f"{prefix}{entry.name}/", entry.path))
                elif entry.is_file():
                    stat = entry.stat()
                    entries.append((prefix + entry.name, stat.st_size, stat.st_mtime_ns))
    return FolderScan(Path(root), tuple(sorted(entries)))
