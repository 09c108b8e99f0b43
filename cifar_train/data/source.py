"""Where the data comes from: `data.dataset` resolved (Hub id, alias, local folder), opened, split, columns found.

Opening gives a `datasets.DatasetDict` and decodes nothing. A local imagefolder is listed by
`cifar_train.data.local` and wrapped in in-memory `datasets.Dataset`s (paths only), everything else goes
through `datasets.load_dataset` / `load_from_disk`. The image and label columns are detected from the
features (`Image`, `ClassLabel`) unless named.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_train.data.local import FolderScan, ImageFolderListing, scan_folder
from cifar_train.digits import DIGITS_ALIAS, materialize_digits
from cifar_train.errors import UserError, did_you_mean
from cifar_train.hub import OFFLINE_REASON, hub_offline, hub_unavailable
from cifar_train.wording import setting

__all__ = [
    "DATASET_ALIASES",
    "OneSplit",
    "dataset_builder",
    "dataset_identity",
    "default_cache_dir",
    "detect_columns",
    "feature_kind",
    "first_line",
    "known_pipeline",
    "open_dataset",
    "open_one_split",
    "pick_columns",
    "pick_split",
    "quiet_datasets",
    "resolve_dataset",
    "split_classes",
    "split_identity",
    "split_records",
]

DATASET_ALIASES: dict[str, str] = {
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "kmnist": "tanganke/kmnist",  # parquet copy, no loading script (remote code) needed
    "imagenet": "ILSVRC/imagenet-1k",  # gated on the Hub: accept its terms and log in first
}

# Label columns preferred when a dataset has several `ClassLabel` columns (CIFAR-100: fine before coarse).
_PREFERRED_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
_SMALL = ("cifar10", "cifar100", "mnist", "fashion_mnist", "kmnist")
_KNOWN_PIPELINES = {
    **{name: "memory" for name in (*_SMALL, *(DATASET_ALIASES[alias] for alias in _SMALL), DIGITS_ALIAS)},
    "imagenet": "streaming",
    DATASET_ALIASES["imagenet"]: "streaming",
}
_SPLIT_ORDER = ("train", "validation", "test")
_LOCAL_LAYOUTS = "parquet shards, an imagefolder or a save_to_disk folder"


def default_cache_dir() -> Path:
    """`$CIFAR_RECIPES_CACHE`, or `~/.cache/cifar_recipes`."""
    return Path(os.environ.get("CIFAR_RECIPES_CACHE") or Path.home() / ".cache" / "cifar_recipes")


def known_pipeline(dataset: str) -> str | None:
    """The pipeline of a dataset known by name (decoded "memory" or "streaming"), without touching it; else None."""
    return _KNOWN_PIPELINES.get(dataset)


def dataset_identity(dataset: str) -> tuple[str, str | None, str]:
    """`(name, Hub id or None, what it is)` of `data.dataset` as a user gave it, for people; touches nothing.

    An alias is its own name (`cifar10`, with its Hub id), a Hub id is itself, and a local folder is named by
    its last part only: a path on the machine that trained is no dataset name for anyone else.
    """
    if dataset in DATASET_ALIASES:
        return dataset, DATASET_ALIASES[dataset], f"the Hub's {DATASET_ALIASES[dataset]}"
    if dataset == DIGITS_ALIAS:
        return dataset, None, "scikit-learn's 8x8 handwritten digits"
    looks_local = dataset.startswith((".", "/", "~")) or dataset.count("/") != 1 or Path(dataset).expanduser().exists()
    if looks_local:
        return Path(dataset).expanduser().resolve().name or dataset, None, "a local copy"
    return dataset, dataset, "from the Hugging Face Hub"


def resolve_dataset(dataset: str) -> tuple[str, bool]:
    """Turn `data.dataset` into `(hub id or absolute local path, is_local)`.

    An existing local path wins over a Hub id of the same spelling; a bare word must be an alias.
    """
    if dataset in DATASET_ALIASES:
        return DATASET_ALIASES[dataset], False
    if dataset == DIGITS_ALIAS:  # bundled with scikit-learn: written once as a local parquet dataset
        return str(materialize_digits(default_cache_dir())), True
    path = Path(dataset).expanduser()
    if path.exists():
        return str(path.resolve()), True
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1 or (os.sep != "/" and os.sep in dataset):
        raise UserError(f"data.dataset: local path {dataset!r} does not exist")
    if "/" not in dataset:
        aliases = [*DATASET_ALIASES, DIGITS_ALIAS]
        raise UserError(
            f"data.dataset: unknown dataset alias {dataset!r}{did_you_mean(dataset, aliases)}; "
            f"known aliases: {', '.join(aliases)} (or give a Hub id 'owner/name' or a local path)"
        )
    return dataset, False


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def idx_hint(path: str, idx_files: Sequence[str]) -> UserError:
    """The raw MNIST-family format (`train-images-idx3-ubyte[.gz]`), which `datasets` cannot read."""
    return UserError(
        f"data.dataset: {path!r} holds raw idx files ({', '.join(idx_files[:2])}), the original MNIST / "
        "Fashion-MNIST / KMNIST format, which `datasets` does not read; use the alias instead (mnist, "
        "fashion_mnist, kmnist: the same images from the Hub), or convert the files to an imagefolder "
        "(<split>/<label>/<n>.png) or parquet shards"
    )


def open_dataset(name: str, is_local: bool, scan: FolderScan | None = None) -> Any:
    """A resolved dataset as a `datasets.DatasetDict`, nothing decoded. `scan`: the local folder's, if made."""
    with quiet_datasets():
        if not is_local:
            return _open_hub(name)
        path = Path(name)
        if path.is_file():
            raise UserError(
                f"data.dataset: {name!r} is a file; give the folder that holds the dataset ({_LOCAL_LAYOUTS})"
            )
        scan = scan or scan_folder(path)
        if scan.layout == "idx":
            raise idx_hint(name, scan.idx_files)
        if scan.imagefolder is not None:
            return _imagefolder_dict(scan.imagefolder)
        return _open_local(name, scan)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars while we open a dataset: our own output says what happens."""
    import datasets

    were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_enabled:
            datasets.enable_progress_bars()


def _imagefolder_dict(listing: ImageFolderListing) -> Any:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=listing.class_names)})
    order = sorted(listing.files, key=lambda split: (_SPLIT_ORDER.index(split), split))
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": listing.files[split], "label": listing.labels[split]}, features=features
            )
            for split in order
        }
    )


def _open_local(name: str, scan: FolderScan) -> Any:
    import datasets

    try:
        if scan.layout == "save_to_disk":
            loaded = datasets.load_from_disk(name)
        else:
            # `datasets` keys its Arrow cache of a local folder by the folder's name, not its contents, so a
            # changed folder (or another of the same name) would be served stale rows: rebuild it.
            loaded = datasets.load_dataset(name, download_mode="force_redownload")
    except (FileNotFoundError, ValueError) as err:
        raise UserError(
            f"data.dataset: cannot read a dataset from {name!r} ({first_line(err)}); it should hold {_LOCAL_LAYOUTS}"
        ) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _open_hub(hub_id: str) -> Any:
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:  # the library will go to the network: fail now, not after retries
        reason = hub_unavailable()
        if reason is not None:
            raise _hub_error(hub_id, reason)
    try:
        loaded = datasets.load_dataset(hub_id)
    except (ConnectionError, FileNotFoundError) as err:
        raise _hub_error(hub_id, OFFLINE_REASON if hub_offline() else first_line(err)) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _hub_error(hub_id: str, reason: str) -> UserError:
    if hub_offline():
        fix = "unset HF_HUB_OFFLINE where the Hub is reachable to download it into the Hugging Face cache"
    else:
        fix = "download it where the Hub is reachable (HF_HUB_OFFLINE=1 then uses that cached copy)"
    return UserError(
        f"data.dataset: cannot load {hub_id!r} from the Hugging Face Hub: {reason}; {fix}, "
        f"or point data.dataset at a local copy ({_LOCAL_LAYOUTS})"
    )


@dataclass
class OneSplit:
    """A dataset with one split opened: what `StreamingSplit.open` needs of a `DatasetSource`."""

    shown: str
    splits: dict[str, Any]


def dataset_builder(source: Any) -> Any:
    """`datasets`' builder of a `DatasetSource`: its files per split and, for the Hub, its card's split sizes."""
    import datasets

    try:
        with quiet_datasets():
            return datasets.load_dataset_builder(source.name)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise UserError(f"data.dataset: cannot read the layout of {source.shown!r}: {first_line(err)}") from err


def open_one_split(source: Any, split: str, setting: str) -> Any:
    """`source` (a `DatasetSource`) with only `split` opened: only that split's files are read or downloaded,
    where opening the whole dataset converts (local parquet) or downloads (the Hub) every split first."""
    import datasets

    layout = source.scan.layout if source.scan is not None else None
    if layout in ("imagefolder", "save_to_disk"):  # a file listing, a memory map: opening them all costs nothing
        return source
    files = dataset_builder(source).config.data_files or {}
    rows = pick_split(files, split, setting)  # the error names the splits there are
    local = dict(download_mode="force_redownload") if source.is_local else {}  # as `_open_local`, for the same reason
    try:
        with quiet_datasets():
            loaded = datasets.load_dataset(source.name, data_files={split: list(rows)}, split=split, **local)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise UserError(f"{setting}: cannot open split {split!r} of {source.shown!r}: {first_line(err)}") from err
    return OneSplit(source.shown, {split: loaded})


def pick_split(splits: Any, split: str, setting: str) -> Any:
    """`splits[split]`, or an error naming `setting` (e.g. `data.val_split`, `--split`) and the splits there are."""
    if split not in splits:
        hint = ""
        if setting == "data.val_split":
            hint = ' (or set data.val_split = "" with data.val_fraction > 0 to hold out part of train)'
        raise UserError(
            f"{setting}: split {split!r} not found{did_you_mean(split, splits)}; "
            f"this dataset has: {', '.join(splits)}{hint}"
        )
    return splits[split]


def detect_columns(features: Any, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """Image and label column names, from a `datasets.Features` unless given explicitly."""
    return pick_columns({name: feature_kind(feature) for name, feature in features.items()}, image_column, label_column)


def feature_kind(feature: Any) -> str:
    """ "Image", "ClassLabel", or a plain value's dtype ("int64", "string", "float32", ...), else the type's name."""
    dtype = getattr(feature, "dtype", None)
    return dtype if type(feature).__name__ == "Value" and isinstance(dtype, str) else type(feature).__name__


_LABEL_KINDS = ("ClassLabel", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string",
                "large_string")  # fmt: skip


def pick_columns(kinds: dict[str, str], image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """Image and label columns from `{column: kind}` (`feature_kind`: "Image", "ClassLabel", "int64", ...).

    Detected: the first Image column; the ClassLabel column (CIFAR-100: fine before coarse), else an integer or
    string column with a usual label name (label, labels, class, target, ...). A named label column must hold
    a ClassLabel, integers or strings (`cifar_train.data.classes`).
    """
    listing = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    for given, key in ((image_column, "data.image_column"), (label_column, "data.label_column")):
        if given is not None and given not in kinds:
            hint = did_you_mean(given, kinds)
            raise UserError(f"{setting(key)}: column {given!r} not found{hint}; columns: {listing}")
    if image_column is None:
        images = [name for name, kind in kinds.items() if kind == "Image"]
        if not images:
            raise UserError(
                f"{setting('data.image_column')}: no Image column detected; columns: {listing}; name one explicitly"
            )
        image_column = images[0]
    elif kinds[image_column] != "Image":
        raise UserError(f"{setting('data.image_column')}: column {image_column!r} holds no images; columns: {listing}")
    if label_column is None:
        classlabels = [name for name, kind in kinds.items() if kind == "ClassLabel"]
        named = [name for name in _PREFERRED_LABEL_COLUMNS if kinds.get(name) in _LABEL_KINDS]
        candidates = [name for name in _PREFERRED_LABEL_COLUMNS if name in classlabels] + classlabels + named
        if not candidates:
            raise UserError(
                f"{setting('data.label_column')}: no label column detected (a ClassLabel, or integers or strings "
                f"named {', '.join(_PREFERRED_LABEL_COLUMNS)}); columns: {listing}; name one explicitly"
            )
        label_column = candidates[0]
    elif kinds[label_column] not in _LABEL_KINDS:
        raise UserError(
            f"{setting('data.label_column')}: column {label_column!r} holds {kinds[label_column]} values; labels "
            "must be a ClassLabel, integers (class indices) or strings (class names)"
        )
    return image_column, label_column


def split_classes(split: Any, label_column: str, where: str) -> tuple[np.ndarray, list[str]]:
    """The label column as int64 class indices in the split's row order, and the class names
    (`cifar_train.data.classes`: a ClassLabel, integers or strings; anything else is refused)."""
    from cifar_train.data.classes import encode_labels

    values = split.with_format("arrow")[label_column]
    return encode_labels(values, split.features[label_column], label_column, where)


def split_records(split: Any, image_column: str, start: int, stop: int) -> list[tuple[bytes | None, str | None]]:
    """Rows `start:stop` of an Image column, undecoded: `(encoded bytes or None, file path or None)` each."""
    images = split.with_format("arrow")[start:stop].column(image_column).combine_chunks()
    return list(zip(images.field("bytes").to_pylist(), images.field("path").to_pylist()))


def split_identity(split: Any) -> str:
    """What names a split's contents, to key its decoded cache.

    `datasets` has no public accessor for a dataset's fingerprint (the hash of its Arrow files and the
    operations applied), so this is the one place that reads the private `_fingerprint`.
    """
    return split._fingerprint
