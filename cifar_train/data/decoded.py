"""Splits decoded once into uint8 tensors and cached: train, validation (a split or a held-out fraction),
a class-stratified `train_limit`, the statistics, and one summary line per split.

A warm start of a local folder costs one `os.scandir` walk (its file signature keys the cache) and a
memory map: the dataset is not opened through `datasets` at all. Only a split missing from the cache
opens the dataset, and then the split is decoded on every core (`cifar_train.data.decode`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from cifar_train.atomic import read_only_above
from cifar_train.data import cache
from cifar_train.data.classes import class_map
from cifar_train.data.decode import decode_images
from cifar_train.data.info import DatasetInfo, mean_std, summary_line
from cifar_train.data.local import FolderScan, scan_folder
from cifar_train.data.source import (
    DATASET_ALIASES,
    default_cache_dir,
    detect_columns,
    open_dataset,
    pick_split,
    resolve_dataset,
    split_classes,
    split_identity,
    split_records,
)
from cifar_train.digits import DIGITS_ALIAS
from cifar_train.errors import UserError
from cifar_train.wording import setting

__all__ = ["DatasetSource", "DecodedSplit", "load_dataset_splits", "load_split", "load_splits", "stratified_subset"]

Say = Callable[[str], None]


@dataclass
class DecodedSplit:
    """A split decoded into memory."""

    images: torch.Tensor  # uint8 (N, C, H, W), contiguous
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class DatasetSource:
    """`data.dataset` resolved, its local folder scanned once; opened through `datasets` only when needed."""

    def __init__(self, dataset: str, cache_dir: str | os.PathLike | None = None) -> None:
        self.given = dataset  # as the user spelt it (an alias, a Hub id, a path)
        self.name, self.is_local = resolve_dataset(dataset)
        # what people are shown: an alias stays an alias (not the cache folder `digits` is written to)
        self.shown = dataset if dataset in (*DATASET_ALIASES, DIGITS_ALIAS) else self.name
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        local_folder = self.is_local and Path(self.name).is_dir()
        self.scan: FolderScan | None = scan_folder(Path(self.name)) if local_folder else None

    @cached_property
    def splits(self) -> Any:
        """The `datasets.DatasetDict` (opened on first use)."""
        return open_dataset(self.name, self.is_local, self.scan)

    def cached(self, split: str, image_column: str | None, label_column: str | None, skip_corrupt: bool) -> Any:
        """A local folder's decoded split from the cache, found by the folder's signature alone; else None."""
        if self.scan is None:
            return None
        return cache.load_entry(self._local_entry(split, image_column, label_column, skip_corrupt))

    def _local_entry(self, *request: Any) -> Path:
        return cache.entry_path(self.cache_dir, [self.name, self.scan.signature, *request])

    def split(
        self,
        split: str,
        *,
        setting: str,  # the recipe key or option that named the split, for messages
        image_column: str | None,
        label_column: str | None,
        skip_corrupt: bool,
        say: Say,
    ) -> tuple[dict[str, Any], str]:
        """A decoded split (the cache entry) and how it was had ("cache hit 0.1 s" / "decoded in 38.2 s")."""
        started = time.perf_counter()
        entry = self.cached(split, image_column, label_column, skip_corrupt)
        if entry is not None:
            return entry, f"cache hit {time.perf_counter() - started:.1f} s"
        path = self._local_entry(split, image_column, label_column, skip_corrupt) if self.scan else None
        rows = pick_split(self.splits, split, setting)
        image_column, label_column = detect_columns(rows.features, image_column, label_column)
        if path is None:  # a Hub dataset: its Arrow files' fingerprint names the contents
            path = cache.entry_path(
                self.cache_dir, [split_identity(rows), split, image_column, label_column, skip_corrupt]
            )
            entry = cache.load_entry(path)
            if entry is not None:
                return entry, f"cache hit {time.perf_counter() - started:.1f} s"
        blocked = read_only_above(path.parent)
        if blocked is not None:  # decode anyway, but say that the next start will decode again
            say(
                f"warning: the decode cache {str(self.cache_dir)!r} cannot be written ({str(blocked)!r} is read-only), "
                f"so split {split!r} is decoded without being kept; set data.cache_dir or $CIFAR_RECIPES_CACHE to a "
                "writable folder to keep it"
            )
        entry = _decode(rows, split, image_column, label_column, skip_corrupt=skip_corrupt, say=say)
        if blocked is None:
            cache.save_entry(entry, path)
        return entry, f"decoded in {time.perf_counter() - started:.1f} s"


def _decode(rows: Any, split: str, image_column: str, label_column: str, *, skip_corrupt: bool, say: Say) -> dict:
    decoded = decode_images(
        len(rows),
        lambda start, stop: split_records(rows, image_column, start, stop),
        split=split,
        skip_corrupt=skip_corrupt,
        say=say,
    )
    where = f"{setting('data.label_column')} {label_column!r} of split {split!r}"
    labels, names = split_classes(rows, label_column, where)
    return {
        "images": torch.from_numpy(decoded.images),
        "labels": torch.from_numpy(labels[decoded.kept]),
        "pixel_sums": torch.from_numpy(decoded.sums),
        "pixel_squares": torch.from_numpy(decoded.squares),
        "skipped": decoded.skipped,
        "skipped_files": decoded.skipped_files,
        "class_names": names,
        "image_column": image_column,
        "label_column": label_column,
    }


def _warn_skipped(split: str, entry: dict[str, Any], say: Say) -> None:
    """Every run says which corrupt images were left out, also when the decoded data comes from the cache:
    through `say` when the caller shows progress (the training loop), else as a Python warning."""
    rows, files = entry["skipped"], [file for file in entry["skipped_files"] if file]
    if rows:
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        named = f"; files: {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}" if files else ""
        message = f"skipped {len(rows)} corrupt image(s): split {split!r}, index {shown}{named}"
        if say is _silent:
            warnings.warn(message, stacklevel=3)
        else:
            say(f"warning: {message}")


def _statistics(entry: dict[str, Any], index: torch.Tensor | None) -> tuple[int, tuple, tuple]:
    """`(images, mean, std)` of a cache entry's rows `index` (all rows: None)."""
    sums, squares, images = entry["pixel_sums"], entry["pixel_squares"], entry["images"]
    if index is not None:
        sums, squares = sums[index], squares[index]
    return len(sums), *mean_std(sums, squares, images.shape[2] * images.shape[3])


def _summary(name: str, split: str, entry: dict, index: torch.Tensor | None, classes: int, how: str) -> str:
    count, mean, std = _statistics(entry, index)
    shape = entry["images"].shape[1:]
    return summary_line(name, split, images=count, num_classes=classes, shape=shape, mean=mean, std=std, how=how)


def load_split(
    dataset: str | DatasetSource,
    *,
    split: str,
    setting: str = "data.train_split",  # what named the split, for messages: "data.val_split", "--split", ...
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt: bool = False,
    say: Say | None = None,
) -> tuple[DecodedSplit, DatasetInfo]:
    """One split decoded (cached), with its own statistics in the info: what evaluation needs."""
    say = say or _silent
    source = dataset if isinstance(dataset, DatasetSource) else DatasetSource(dataset, cache_dir)
    entry, how = source.split(
        split, setting=setting, image_column=image_column, label_column=label_column, skip_corrupt=skip_corrupt, say=say
    )
    _warn_skipped(split, entry, say)
    decoded = DecodedSplit(entry["images"], entry["labels"])
    info = _info(source.shown, entry, None, {split: list(entry["skipped"])} if entry["skipped"] else {})
    say(_summary(source.shown, split, entry, None, info.num_classes, how))
    return decoded, info


def load_dataset_splits(
    dataset: str,
    *,
    train_split: str = "train",
    val_split: str | None = "test",
    val_fraction: float = 0.0,
    train_limit: int = 0,  # images; 0 = all
    image_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt: bool = False,
    say: Say | None = None,
) -> tuple[DecodedSplit, DecodedSplit, DatasetInfo]:
    """Decode the train and validation splits into memory (once; later calls read the cache).

    Validation is the split `val_split`, or, with `val_split` None (or "") and `val_fraction > 0`, a held-out
    fraction of train chosen by `seed` (the same for every process and every run with that seed). With
    neither, the validation split is empty. `train_limit` then keeps a seeded, class-stratified subset of
    the training images. Mean and std come from the training images (all of them: a `train_limit` subset is
    normalised as the full run is).
    Cached tensors are memory-mapped from the cache file (copy-on-write: writes never reach the file).
    """
    _check_val(val_split or None, val_fraction)
    return load_splits(
        DatasetSource(dataset, cache_dir),
        train_split=train_split,
        val_split=val_split or None,
        val_fraction=val_fraction,
        train_limit=train_limit,
        image_column=image_column,
        label_column=label_column,
        seed=seed,
        skip_corrupt=skip_corrupt,
        say=say or _silent,
    )


def load_splits(
    source: DatasetSource,
    *,
    train_split: str,
    val_split: str | None,
    val_fraction: float,
    train_limit: int,
    image_column: str | None,
    label_column: str | None,
    seed: int,
    skip_corrupt: bool,
    say: Say,
) -> tuple[DecodedSplit, DecodedSplit, DatasetInfo]:
    """`load_dataset_splits` on a source already resolved (and scanned)."""
    columns = dict(image_column=image_column, label_column=label_column, skip_corrupt=skip_corrupt, say=say)
    train, train_how = source.split(train_split, setting="data.train_split", **columns)
    # The same request as train's (not its detected columns): evaluation asks for the split the same way and
    # so finds the same cache entry.
    val, val_how = source.split(val_split, setting="data.val_split", **columns) if val_split else (None, "")
    if val is not None and (val["image_column"], val["label_column"]) != (train["image_column"], train["label_column"]):
        raise UserError(
            f"data.val_split: split {val_split!r} has image/label columns {val['image_column']}/{val['label_column']} "
            f"but train has {train['image_column']}/{train['label_column']}; name them with data.image_column "
            "and data.label_column"
        )
    skipped = {}
    for name, entry in ((train_split, train), (val_split, val)):
        if entry is not None and entry["skipped"]:
            _warn_skipped(name, entry, say)
            skipped[name] = list(entry["skipped"])
    if val is not None and val["images"].shape[1:] != train["images"].shape[1:]:
        raise UserError(
            f"data.val_split: images of split {val_split!r} are {tuple(val['images'].shape[1:])} (C, H, W) "
            f"but train's are {tuple(train['images'].shape[1:])}; both splits need the same shape"
        )

    keep, held_out = _held_out(train["labels"], val_fraction, seed)
    # Mean and std of every training image (held-out ones excluded), also under train_limit: a quick study
    # on a subset normalises exactly as the full run does.
    info = _info(source.shown, train, keep, skipped)
    if train_limit and train_limit < len(keep):
        keep = keep[stratified_subset(train["labels"][keep], train_limit, seed)]
    classes, name = info.num_classes, source.shown
    limited = f" (stratified subset, seed {seed})" if train_limit and len(keep) == train_limit else ""
    say(_summary(name, train_split, train, keep, classes, train_how + limited))
    if val is not None:
        say(_summary(name, val_split, val, None, classes, val_how))
        mapping = class_map(
            val["class_names"], train["class_names"], what=f"the classes of split {val_split!r}",
            target_what=f"those of split {train_split!r}",
        )  # fmt: skip
        val_data = DecodedSplit(
            val["images"], val["labels"] if mapping is None else torch.from_numpy(mapping)[val["labels"]]
        )
    elif held_out is not None:
        say(_summary(name, f"{train_split} held-out {val_fraction}", train, held_out, classes, f"seed {seed}"))
        val_data = _select(train, held_out)
    else:
        val_data = _select(train, torch.zeros(0, dtype=torch.int64))
    return _select(train, keep), val_data, info


def _check_val(val_split: str | None, val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction: {val_fraction!r} is out of range; use a value in [0, 1)")
    if val_split is not None and val_fraction > 0:
        raise UserError(
            f"data.val_split = {val_split!r} and data.val_fraction = {val_fraction!r} contradict; use either a "
            'named validation split or a held-out fraction of train (data.val_split = "")'
        )


def _held_out(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(training rows, held-out rows or None)`, both sorted; the held-out rows are a seeded random share."""
    count = len(labels)
    if fraction == 0:
        return torch.arange(count), None
    num_val = round(count * fraction)
    if not 0 < num_val < count:
        raise UserError(
            f"data.val_fraction: {fraction!r} of {count} training images leaves {num_val} for validation; "
            "choose a fraction that holds out at least one image and keeps one"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[num_val:].sort().values, order[:num_val].sort().values


def stratified_subset(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """`limit` row indices (sorted), every class as equally represented as its size allows, chosen by `seed`.

    Class counts differ by at most one unless a class has too few images (the others then fill in).
    Class-sorted folders (imagefolder) would otherwise give the first N images: one or two classes.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    by_class = order[torch.argsort(labels[order], stable=True)]  # grouped by class, random within a class
    _, counts = torch.unique(labels, return_counts=True)
    quota = _quotas(counts.tolist(), limit, generator)
    starts = torch.cumsum(counts, 0) - counts
    picked = [by_class[start : start + take] for start, take in zip(starts.tolist(), quota)]
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.int64)


def _quotas(counts: list[int], limit: int, generator: torch.Generator) -> list[int]:
    """Images per class: `limit` spread evenly, the remainder to seeded random classes, capped by `counts`."""
    quota = [0] * len(counts)
    remaining = min(limit, sum(counts))
    while remaining > 0:
        open_classes = [c for c in range(len(counts)) if quota[c] < counts[c]]
        share, extra = divmod(remaining, len(open_classes))
        lucky = set(torch.randperm(len(open_classes), generator=generator)[:extra].tolist())
        for position, c in enumerate(open_classes):
            take = min(counts[c] - quota[c], share + (position in lucky))
            quota[c] += take
            remaining -= take
    return quota


def _select(entry: dict[str, Any], index: torch.Tensor) -> DecodedSplit:
    """Rows `index` of a cache entry; all of them stay the memory map itself (no copy)."""
    images, labels = entry["images"], entry["labels"]
    if len(index) == len(labels):
        return DecodedSplit(images, labels)
    return DecodedSplit(images[index].contiguous(), labels[index])


def _info(name: str, entry: dict[str, Any], index: torch.Tensor | None, skipped: dict) -> DatasetInfo:
    _, mean, std = _statistics(entry, index)
    channels, height, width = (int(size) for size in entry["images"].shape[1:])
    return DatasetInfo(
        name=name,
        num_classes=len(entry["class_names"]),
        class_names=list(entry["class_names"]),
        channels=channels,
        image_size=(height, width),
        mean=mean,
        std=std,
        skipped_images=skipped,
    )


def _silent(line: str) -> None:
    pass
