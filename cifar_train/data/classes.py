"""Classes: a label column of any usable type as class indices with names, and two sources' classes matched.

A label column is a `ClassLabel` (indices with names), plain integers (class k is k; the names are "0".."K-1"),
or strings (each distinct string is a class; classes are the sorted names). Anything else (floats, booleans,
lists) is refused: a float label truncated to an integer would train on classes nobody chose.

Wherever the labels of two sources meet (a validation split and its training split, a dataset and a trained
model's `label_names`, a resumed run and its checkpoint), the classes are matched **by name**, never by
position: a folder whose class names sort differently, or a parquet copy with its own class order, must not
silently relabel every image. Integer labels carry no names; they match by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cifar_train.errors import UserError

__all__ = ["class_map", "encode_labels", "has_names", "integer_names", "label_kind"]

_INTEGER_TYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_STRING_TYPES = ("string", "large_string")


def integer_names(count: int) -> list[str]:
    """The names of integer labels: "0".."count-1"."""
    return [str(index) for index in range(count)]


def has_names(names: Sequence[str]) -> bool:
    """Whether `names` say what the classes are (a `ClassLabel`, strings), not just their indices "0".."K-1"."""
    return list(names) != integer_names(len(names))


def label_kind(feature: Any) -> str | None:
    """ "classlabel", "integer" or "string" for a usable label feature, else None."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return "classlabel"
    dtype = getattr(feature, "dtype", None) if isinstance(feature, datasets.Value) else None
    if dtype in _INTEGER_TYPES:
        return "integer"
    if dtype in _STRING_TYPES:
        return "string"
    return None


def describe_feature(feature: Any) -> str:
    """A feature's type as a person reads it: `float64`, `bool`, `Sequence`, `ClassLabel`."""
    return getattr(feature, "dtype", None) or type(feature).__name__


def encode_labels(values: Any, feature: Any, column: str, where: str) -> tuple[np.ndarray, list[str]]:
    """`(int64 class indices, class names)` of a label column's `values` (a pyarrow array or a sequence).

    `where` names the column's place for messages ("data.label_column 'y' of split 'train'").
    """
    kind = label_kind(feature)
    if kind is None:
        raise UserError(
            f"{where} holds {describe_feature(feature)} values; labels must be a ClassLabel, integers (class "
            "indices) or strings (class names)"
        )
    if kind == "string":
        strings = np.asarray(_to_list(values), dtype=object)
        if any(value is None for value in strings):
            raise UserError(f"{where} has rows without a label (null); every image needs its class")
        names, labels = np.unique(strings.astype(str), return_inverse=True)
        return labels.astype(np.int64), [str(name) for name in names]
    labels = np.asarray(_to_list(values))
    if labels.dtype == object:  # nulls: pyarrow gives None
        raise UserError(f"{where} has rows without a label (null); every image needs its class")
    labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise UserError(
            f"{where} holds negative labels (e.g. {int(labels.min())}, which some datasets use for unlabelled "
            "test images); train and validate on a split whose every image has its class"
        )
    if kind == "classlabel":
        names = list(feature.names)
        if len(labels) and labels.max() >= len(names):
            raise UserError(f"{where} holds label {int(labels.max())} but its ClassLabel names {len(names)} classes")
        return labels, names
    return labels, integer_names(int(labels.max()) + 1 if len(labels) else 0)


def _to_list(values: Any) -> list:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def class_map(names: Sequence[str], target: Sequence[str], *, what: str, target_what: str) -> np.ndarray | None:
    """Indices into `target` for each class of `names`, matched by name; None when they are the same list.

    Integer labels (names "0".."K-1" on either side) match by index. `what` / `target_what` name the two
    sources for the message when a class of `names` is not among `target`'s ("the dataset's classes",
    "the model's classes").
    """
    names, target = list(names), list(target)
    if names == target:
        return None
    if not has_names(names) or not has_names(target):
        if len(names) > len(target):
            raise UserError(
                f"{what} are {len(names)} ({_listing(names)}) but {target_what} are {len(target)} "
                f"({_listing(target)}); integer labels match by index, so there must not be more of them"
            )
        return np.arange(len(names), dtype=np.int64)
    index = {name: position for position, name in enumerate(target)}
    missing = [name for name in names if name not in index]
    if missing:
        unused = [name for name in target if name not in set(names)]
        raise UserError(
            f"{what} do not match {target_what} by name: {_listing(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not among them"
            + (f" (theirs not found here: {_listing(unused)})" if unused else "")
            + "; classes are matched by name, never by position: rename the folders or classes to match"
        )
    return np.asarray([index[name] for name in names], dtype=np.int64)


def _listing(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(name) for name in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
