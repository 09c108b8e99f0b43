"""Datasets from the Hugging Face Hub or a local copy, decoded once into uint8 tensors.

Two paths:

* **in memory** (CIFAR, the MNIST family): every image is decoded once into a `(N, C, H, W)` uint8 tensor
  that is cached on disk, keyed by the dataset's fingerprint. The loop indexes batches with
  `ShardedBatchSampler` and augments them on its device (`cifar_train.augment.BatchAugment`).
* **streaming** (ImageNet-sized data): a `DataLoader` with workers and timm's per-sample transforms
  (`build_streaming_loader`). `choose_data_path` picks the path from the decoded size.

`data.dataset` is a Hub id, one of the `DATASET_ALIASES`, or a local folder: the Hub's parquet layout,
an `imagefolder` tree (one sub-folder per class) or a `save_to_disk` folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import socket
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset

from cifar_train.digits import DIGITS_ALIAS, materialize_digits
from cifar_train.errors import UserError, did_you_mean

__all__ = [
    "DATASET_ALIASES",
    "DatasetInfo",
    "DecodedSplit",
    "ShardedBatchSampler",
    "build_streaming_loader",
    "choose_data_path",
    "default_cache_dir",
    "load_dataset_splits",
    "open_dataset",
    "resolve_dataset",
    "streaming_dataset_info",
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
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_CACHE_FORMAT = 1  # bump when the cached file layout or decoding changes
_STATS_CHUNK = 4096  # images per chunk when computing per-image pixel sums (bounds peak memory)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the augmentation need to know about a dataset."""

    name: str  # what the user passed, resolved (Hub id or local path)
    num_classes: int
    class_names: list[str]
    channels: int  # 1 or 3
    image_size: tuple[int, int]  # (H, W) of the decoded images; streaming: the train crop size
    mean: tuple[float, ...]  # per channel, in [0, 1], from the training images
    std: tuple[float, ...]
    skipped_images: dict[str, list[int]] = field(default_factory=dict)  # split -> corrupt indices left out


@dataclass
class DecodedSplit:
    """A split decoded into memory."""

    images: torch.Tensor  # uint8 (N, C, H, W), contiguous
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def check_data(
    *,
    dataset: str = "cifar10",
    train_split: str = "train",
    val_split: str | None = "test",
    val_fraction: float = 0.0,
    train_limit: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    pipeline: str = "auto",
    num_workers: int = 4,
    image_size: int = 224,
    eval_resize: int = 256,
    min_scale: float = 0.08,
    cache_dir: str | None = None,
    skip_corrupt: bool = False,
):
    """The [data] section's rules that need no data (temporary; the data package replaces it)."""
    from cifar_train.recipe import Findings

    if val_split and val_fraction > 0:
        raise UserError(
            f"data.val_split = {val_split!r} and data.val_fraction = {val_fraction} contradict; "
            'set data.val_split = "" to hold out a fraction of train, or val_fraction = 0'
        )
    if not val_split and val_fraction == 0:
        raise UserError('data.val_split = "" needs data.val_fraction > 0 (the share of train to hold out)')
    if pipeline == "streaming" and not val_split:
        raise UserError('data.pipeline = "streaming" needs a named data.val_split (e.g. "validation")')
    if eval_resize < image_size:
        raise UserError(f"data.eval_resize = {eval_resize} must be >= data.image_size = {image_size}")
    return Findings()


# --------------------------------------------------------------------------------------------------
# Resolving and opening


def default_cache_dir() -> Path:
    """`$CIFAR_RECIPES_CACHE`, or `~/.cache/cifar_recipes`."""
    return Path(os.environ.get("CIFAR_RECIPES_CACHE") or Path.home() / ".cache" / "cifar_recipes")


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


def _hub_offline() -> bool:
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A fast TCP probe of the Hub, so an offline machine fails in seconds rather than after retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_error(hub_id: str, reason: str) -> UserError:
    return UserError(
        f"data.dataset: cannot load {hub_id!r} from the Hugging Face Hub ({reason}); download it where the Hub "
        f"is reachable (or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache), or point "
        f"data.dataset at a local copy (parquet shards, imagefolder or save_to_disk folder)"
    )


def open_dataset(dataset: str) -> tuple[Any, str]:
    """Open `data.dataset` as a `datasets.DatasetDict` without decoding anything; returns `(dict, resolved name)`."""
    import datasets

    name, is_local = resolve_dataset(dataset)
    with _quiet_datasets():
        return _open_resolved(datasets, name, is_local)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars while we open a dataset: our own output says what happens."""
    import datasets

    were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_enabled:
            datasets.enable_progress_bars()


def _open_resolved(datasets: Any, name: str, is_local: bool) -> tuple[Any, str]:
    if is_local:
        path = Path(name)
        if path.is_file():
            raise UserError(
                f"data.dataset: {name!r} is a file; give the folder that holds the dataset "
                "(parquet shards, imagefolder or save_to_disk folder)"
            )
        try:
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                loaded = datasets.load_from_disk(name)
            else:
                # `datasets` keys its Arrow cache for a local folder by the folder's name, not its contents,
                # so a changed folder (or another of the same name) would be served stale rows: rebuild.
                loaded = datasets.load_dataset(name, download_mode="force_redownload")
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"data.dataset: cannot read a dataset from {name!r}: {_first_line(err)}") from err
    else:
        offline = datasets.config.HF_HUB_OFFLINE  # read once, when `datasets` was imported
        if not offline and (_hub_offline() or not _hub_reachable()):
            # Offline requested after `datasets` was imported, or no route to the Hub: fail now, not after retries.
            raise _hub_error(name, "offline mode is on" if _hub_offline() else "the Hub is unreachable")
        try:
            loaded = datasets.load_dataset(name)
        except (ConnectionError, FileNotFoundError) as err:
            raise _hub_error(name, "offline mode is on" if offline else _first_line(err)) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded, name


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _pick_split(splits: Any, split: str, role: str) -> Any:
    if split not in splits:
        hint = "" if role == "train" else " (or set val_split=None with val_fraction > 0 to hold out part of train)"
        raise UserError(
            f"data.{role}_split: split {split!r} not found{did_you_mean(split, splits)}; "
            f"this dataset has: {', '.join(splits)}{hint}"
        )
    return splits[split]


def _detect_columns(features: Any, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """Image and label column names, from the features unless given explicitly."""
    import datasets

    columns = list(features)
    listing = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
    for given, role in ((image_column, "image"), (label_column, "label")):
        if given is not None and given not in features:
            raise UserError(
                f"data.{role}_column: column {given!r} not found{did_you_mean(given, columns)}; columns: {listing}"
            )
    if image_column is None:
        images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if not images:
            raise UserError(f"data.image_column: no Image column detected; columns: {listing}; name one explicitly")
        image_column = images[0]
    if label_column is None:
        labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        if not labels:
            raise UserError(
                f"data.label_column: no ClassLabel column detected; columns: {listing}; name one explicitly"
            )
        preferred = [name for name in _PREFERRED_LABEL_COLUMNS if name in labels]
        label_column = preferred[0] if preferred else labels[0]
    return image_column, label_column


def _class_names(feature: Any, labels: torch.Tensor) -> list[str]:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    count = int(labels.max()) + 1 if labels.numel() else 0  # plain integer labels: classes 0..max
    return [str(index) for index in range(count)]


# --------------------------------------------------------------------------------------------------
# Decoding into memory


def _image_bytes(split: Any, image_column: str) -> list[dict[str, Any]]:
    """The undecoded `{'bytes', 'path'}` records of an Image column."""
    import datasets

    raw = split.cast_column(image_column, datasets.Image(decode=False))
    return _arrow_column(raw, image_column).to_pylist()


def _arrow_column(split: Any, column: str) -> Any:
    """A column as Arrow data, in the split's row order (an indices mapping from `select` is applied)."""
    if split._indices is not None:
        split = split.flatten_indices()
    return split.data.column(column)


def _open_image(record: dict[str, Any] | None) -> PIL.Image.Image:
    if record is None:
        raise OSError("missing image")
    source = io.BytesIO(record["bytes"]) if record.get("bytes") is not None else record["path"]
    image = PIL.Image.open(source)
    image.load()
    return image


def _decode_split(
    split: Any, *, split_name: str, image_column: str, label_column: str, skip_corrupt: bool
) -> dict[str, torch.Tensor]:
    """Decode a split into uint8 `(N, C, H, W)` plus per-image pixel sums for the statistics."""
    records = _image_bytes(split, image_column)
    labels_all = np.asarray(_arrow_column(split, label_column).to_numpy(), dtype=np.int64)
    images: np.ndarray | None = None
    keep: list[int] = []
    skipped: list[int] = []
    mode, size = "RGB", (0, 0)
    for index, record in enumerate(records):
        try:
            image = _open_image(record)
        except (OSError, SyntaxError, ValueError) as err:  # PIL raises these on truncated or invalid files
            if skip_corrupt:
                skipped.append(index)
                continue
            raise UserError(
                f"data.dataset: corrupt image in split {split_name!r} at index {index} ({_first_line(err)}); "
                "fix or remove it, or set data.skip_corrupt = true to skip such images"
            ) from err
        if images is None:
            mode = "L" if image.mode in _GRAYSCALE_MODES else "RGB"
            size = image.size  # (W, H)
            images = np.empty((len(records), size[1], size[0], 1 if mode == "L" else 3), dtype=np.uint8)
        if image.size != size:
            raise UserError(
                f"data.dataset: images differ in size (split {split_name!r}: first {size[1]}x{size[0]}, index "
                f"{index} {image.size[1]}x{image.size[0]}); decode in memory needs one size, use the streaming path"
            )
        if image.mode != mode:
            image = image.convert(mode)
        images[len(keep)] = np.asarray(image).reshape(images.shape[1:])
        keep.append(index)
    if images is None:
        raise UserError(f"data.dataset: split {split_name!r} holds no readable image")
    pixels = torch.from_numpy(images[: len(keep)]).permute(0, 3, 1, 2).contiguous()
    sums, squares = _pixel_sums(pixels)
    labels = torch.from_numpy(labels_all[np.asarray(keep, dtype=np.int64)])
    return {
        "images": pixels,
        "labels": labels,
        "pixel_sums": sums,
        "pixel_squares": squares,
        "skipped": torch.tensor(skipped, dtype=torch.int64),  # indices of corrupt images left out
    }


def _pixel_sums(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel sums of pixel values and of their squares (values in [0, 1]), float64 (N, C)."""
    sums, squares = [], []
    for chunk in images.split(_STATS_CHUNK):
        values = chunk.to(torch.float64).div_(255.0)
        sums.append(values.sum(dim=(2, 3)))
        squares.append(values.square_().sum(dim=(2, 3)))
    return torch.cat(sums), torch.cat(squares)


def _mean_std(sums: torch.Tensor, squares: torch.Tensor, pixels_per_image: int) -> tuple[tuple[float, ...], ...]:
    count = sums.shape[0] * pixels_per_image
    mean = sums.sum(0) / count
    std = (squares.sum(0) / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder and rename it into place: no half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _load_cached(path: Path) -> dict[str, Any] | None:
    """A cache file's contents, memory-mapped (instant); None when absent or unreadable."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        path.unlink(missing_ok=True)  # unreadable (e.g. written by another version): decode again
        return None


def _decoded(
    split: Any,
    *,
    split_name: str,
    image_column: str,
    label_column: str,
    skip_corrupt: bool,
    cache_dir: Path,
    signature: str | None = None,
) -> tuple[dict[str, torch.Tensor], Path]:
    """A decoded split and its cache file, read from the cache when its fingerprint was decoded before.

    For a local folder the folder's file signature is part of the key: `datasets` derives a local
    folder's fingerprint from its name, so a changed folder would otherwise hit the old entry.
    """
    key_fields = [_CACHE_FORMAT, split._fingerprint, signature, image_column, label_column, skip_corrupt]
    path = cache_dir / "decoded" / f"{_digest(key_fields)}.pt"
    decoded = _load_cached(path)
    if decoded is None:
        options = dict(image_column=image_column, label_column=label_column, skip_corrupt=skip_corrupt)
        decoded = _decode_split(split, split_name=split_name, **options)
        _atomic_save(decoded, path)
    return decoded, path


def _digest(fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def _local_signature(path: Path) -> str | None:
    """A fingerprint of a local dataset folder from its files' names, sizes and modification times.

    It lets a later run find its decoded cache without opening the dataset through `datasets` (which
    costs seconds of imports). None for anything that is not a local folder.
    """
    if not path.is_dir():
        return None
    entries = []
    for root, folders, files in os.walk(path):
        folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
        for file in sorted(files):
            if not file.startswith("."):
                stat = os.stat(os.path.join(root, file))
                entries.append([os.path.relpath(os.path.join(root, file), path), stat.st_size, stat.st_mtime_ns])
    return _digest(entries)


def _decode_all(
    dataset: str,
    *,
    train_split: str,
    val_split: str | None,
    image_column: str | None,
    label_column: str | None,
    skip_corrupt: bool,
    cache_dir: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, list[str], str]:
    """Decoded train (and named validation) split, class names and resolved name; cached.

    A local folder is found again through a manifest keyed by its file signature; anything else goes
    through `datasets`, whose split fingerprints key the decoded files.
    """
    name, is_local = resolve_dataset(dataset)
    signature = _local_signature(Path(name)) if is_local else None
    request = [_CACHE_FORMAT, signature, train_split, val_split, image_column, label_column, skip_corrupt]
    manifest_path = cache_dir / "manifests" / f"{_digest(request)}.json"
    if signature is not None and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        train = _load_cached(cache_dir / "decoded" / manifest["train"])
        val = _load_cached(cache_dir / "decoded" / manifest["val"]) if manifest["val"] else None
        if train is not None and (val is not None or not manifest["val"]):
            return train, val, manifest["class_names"], name

    splits, name = open_dataset(dataset)
    train_ds = _pick_split(splits, train_split, "train")
    val_ds = _pick_split(splits, val_split, "val") if val_split is not None else None
    image_column, label_column = _detect_columns(train_ds.features, image_column, label_column)
    if val_ds is not None:
        _detect_columns(val_ds.features, image_column, label_column)  # the same columns must exist there
    options = dict(image_column=image_column, label_column=label_column, skip_corrupt=skip_corrupt, signature=signature)
    train, train_path = _decoded(train_ds, split_name=train_split, cache_dir=cache_dir, **options)
    val, val_path = (None, None)
    if val_ds is not None:
        val, val_path = _decoded(val_ds, split_name=val_split, cache_dir=cache_dir, **options)
    class_names = _class_names(train_ds.features[label_column], train["labels"])
    if signature is not None:
        manifest = {"train": train_path.name, "val": val_path.name if val_path else None, "class_names": class_names}
        _atomic_write_text(json.dumps(manifest), manifest_path)
    return train, val, class_names, name


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_dataset_splits(
    dataset: str,
    *,
    train_split: str = "train",
    val_split: str | None = "test",
    val_fraction: float = 0.0,
    image_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt: bool = False,
) -> tuple[DecodedSplit, DecodedSplit, DatasetInfo]:
    """Decode the train and validation splits into memory (once; later calls read the cache).

    Validation is the split `val_split`, or, with `val_split=None` and `val_fraction > 0`, a held-out
    fraction of train chosen by `seed` (the same for every process and every run with that seed). With
    neither, the validation split is empty. Mean and std come from the training images actually used.
    Cached tensors are memory-mapped from the cache file (copy-on-write: writes never reach the file).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction: {val_fraction!r} is out of range; use a value in [0, 1)")
    if val_split is not None and val_fraction > 0:
        raise UserError(
            f"data.val_fraction: {val_fraction!r} together with val_split={val_split!r}; "
            "use either a named validation split or a held-out fraction of train (set val_split=None)"
        )
    train, val_decoded, class_names, name = _decode_all(
        dataset,
        train_split=train_split,
        val_split=val_split,
        image_column=image_column,
        label_column=label_column,
        skip_corrupt=skip_corrupt,
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
    )
    images, labels = train["images"], train["labels"]
    sums, squares = train["pixel_sums"], train["pixel_squares"]
    skipped = {train_split: train.get("skipped", torch.zeros(0, dtype=torch.int64)).tolist()}
    if val_decoded is not None:
        skipped[val_split] = val_decoded.get("skipped", torch.zeros(0, dtype=torch.int64)).tolist()
    skipped = {split: indices for split, indices in skipped.items() if indices}
    for split, indices in skipped.items():  # every run says so, also when the decoded data comes from the cache
        shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
        warnings.warn(f"skipped {len(indices)} corrupt image(s): split {split!r}, index {shown}", stacklevel=2)

    if val_decoded is not None:
        val = DecodedSplit(val_decoded["images"], val_decoded["labels"])
        if val.images.shape[1:] != images.shape[1:]:
            raise UserError(
                f"data.val_split: images of split {val_split!r} are {tuple(val.images.shape[1:])} (C, H, W) "
                f"but train's are {tuple(images.shape[1:])}; both splits need the same shape"
            )
    elif val_fraction > 0:
        num_val = round(len(labels) * val_fraction)
        if not 0 < num_val < len(labels):
            raise UserError(
                f"data.val_fraction: {val_fraction!r} of {len(labels)} training images leaves "
                f"{num_val} for validation; choose a fraction that holds out at least one image and keeps one"
            )
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        val_index, train_index = order[:num_val].sort().values, order[num_val:].sort().values
        val = DecodedSplit(images[val_index].contiguous(), labels[val_index])
        images, labels = images[train_index].contiguous(), labels[train_index]
        sums, squares = sums[train_index], squares[train_index]
    else:
        val = DecodedSplit(images[:0].clone(), labels[:0].clone())

    height, width = images.shape[2:]
    mean, std = _mean_std(sums, squares, height * width)
    info = DatasetInfo(
        name=name,
        num_classes=len(class_names),
        class_names=class_names,
        channels=int(images.shape[1]),
        image_size=(int(height), int(width)),
        mean=mean,
        std=std,
        skipped_images=skipped,
    )
    return DecodedSplit(images, labels), val, info


# --------------------------------------------------------------------------------------------------
# Sharding


class ShardedBatchSampler:
    """Batches of indices for one rank: all ranks draw the same permutation and take disjoint shards.

    Training (`drop_last=True`): each step consumes `batch_size * num_replicas` samples of the epoch's
    permutation (seeded by `seed + epoch`), rank `r` taking its slice; the tail that cannot fill a global
    batch is dropped, so every rank has the same number of full batches.
    Evaluation (`shuffle=False, drop_last=False`): the ranks together cover every sample exactly once.
    Every rank yields the same number of batches; the last ones may be smaller (or empty) on some ranks.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,  # per rank
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got rank={rank}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch to skip (resuming mid-epoch); reset it to 0 afterwards

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation for `epoch` (call before iterating, as with `DistributedSampler`)."""
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._order()
        if self.drop_last:
            global_batch = self.batch_size * self.num_replicas
            for step in range(self.start_batch, len(self)):
                start = step * global_batch + self.rank * self.batch_size
                yield order[start : start + self.batch_size]
        else:
            shard = order[self.rank :: self.num_replicas]
            for step in range(self.start_batch, len(self)):
                yield shard[step * self.batch_size : (step + 1) * self.batch_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.num_replicas)
        largest_shard = math.ceil(self.num_samples / self.num_replicas)
        return math.ceil(largest_shard / self.batch_size)


# --------------------------------------------------------------------------------------------------
# Streaming (ImageNet-sized data)


def choose_data_path(
    dataset: str,
    *,
    train_split: str = "train",
    image_column: str | None = None,
    max_memory_bytes: int = 8 * 1024**3,  # decoded uint8 size above which the data streams
) -> Literal["memory", "streaming"]:
    """`"memory"` when the training split decodes into `max_memory_bytes` at one image size, else `"streaming"`."""
    splits, _ = open_dataset(dataset)
    train_ds = _pick_split(splits, train_split, "train")
    image_column, _ = _detect_columns(train_ds.features, image_column, label_column=None)
    if len(train_ds) == 0:
        return "memory"
    probe = train_ds.select(range(min(8, len(train_ds))))
    shapes = set()
    for record in _image_bytes(probe, image_column):
        try:
            image = _open_image(record)
        except (OSError, ValueError, PIL.UnidentifiedImageError):
            continue  # a corrupt image is reported (or skipped) by the decoding that follows
        shapes.add((1 if image.mode in _GRAYSCALE_MODES else 3, image.size[1], image.size[0]))
    if len(shapes) > 1:
        return "streaming"
    if not shapes:
        return "memory"
    channels, height, width = shapes.pop()
    return "memory" if len(train_ds) * channels * height * width <= max_memory_bytes else "streaming"


class _TransformedSplit(Dataset):
    """One split of a `datasets.Dataset`, decoded and transformed per sample (picklable for workers)."""

    def __init__(self, split: Any, image_column: str, label_column: str, mode: str, transform: Any) -> None:
        self.split = split.select_columns([image_column, label_column])
        self.image_column = image_column
        self.label_column = label_column
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.split[int(index)]
        image = row[self.image_column]
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return self.transform(image), int(row[self.label_column])


def _stream_mode(split: Any, image_column: str) -> str:
    first = _open_image(_image_bytes(split.select(range(1)), image_column)[0])
    return "L" if first.mode in _GRAYSCALE_MODES else "RGB"


def build_streaming_loader(
    dataset: str,
    *,
    split: str,
    training: bool,
    batch_size: int,  # per rank
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 224,  # train crop and eval crop, pixels
    eval_resize: int = 256,  # eval: shorter side resized to this before the centre crop, pixels
    scale: tuple[float, float] = (0.08, 1.0),  # RandomResizedCrop area range
    hflip: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
    num_workers: int = 4,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A `DataLoader` of `(float normalised images (B, C, S, S), int64 labels (B,))` with timm's transforms.

    Training: RandomResizedCrop to `image_size` + horizontal flip, shuffled and sharded per rank
    (`loader.batch_sampler.set_epoch(epoch)` each epoch), last partial batch dropped. Evaluation: resize
    to `eval_resize` + centre crop `image_size`, in order, every sample exactly once across ranks.
    Per-sample randomness draws from the worker's seeded RNGs, so do not expect bit-exact resume here.
    """
    from timm.data import create_transform

    splits, _ = open_dataset(dataset)
    split_ds = _pick_split(splits, split, "train" if training else "val")
    image_column, label_column = _detect_columns(split_ds.features, image_column, label_column)
    mode = _stream_mode(split_ds, image_column)
    if len(mean) != (1 if mode == "L" else 3) or len(std) != len(mean):
        raise ValueError(f"mean/std need one value per channel ({mode} images), got mean={mean!r} std={std!r}")
    transform = create_transform(
        input_size=(1 if mode == "L" else 3, image_size, image_size),
        is_training=training,
        scale=scale,
        hflip=0.5 if hflip else 0.0,
        color_jitter=0.0,
        interpolation="bilinear",
        crop_pct=image_size / eval_resize,
        mean=tuple(mean),
        std=tuple(std),
    )
    source = _TransformedSplit(split_ds, image_column, label_column, mode, transform)
    sampler = ShardedBatchSampler(
        len(source),
        batch_size,
        num_replicas=num_replicas,
        rank=rank,
        seed=seed,
        shuffle=training,
        drop_last=training,
    )
    return DataLoader(
        source,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Evaluation draws its worker seeds from its own generator, never from the training RNG stream.
        generator=None if training else torch.Generator().manual_seed(seed),
    )


def streaming_dataset_info(
    dataset: str,
    *,
    train_split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    image_size: int = 224,  # pixels; statistics are taken on centre crops of this size
    eval_resize: int = 256,  # pixels
    sample_size: int = 2048,  # training images sampled for mean and std
    seed: int = 0,
) -> DatasetInfo:
    """`DatasetInfo` for the streaming path; mean and std come from a seeded sample of training images."""
    from timm.data import create_transform

    splits, name = open_dataset(dataset)
    train_ds = _pick_split(splits, train_split, "train")
    image_column, label_column = _detect_columns(train_ds.features, image_column, label_column)
    mode = _stream_mode(train_ds, image_column)
    channels = 1 if mode == "L" else 3
    to_tensor = create_transform(
        input_size=(channels, image_size, image_size),
        is_training=False,
        crop_pct=image_size / eval_resize,
        interpolation="bilinear",
        normalize=False,
    )
    count = min(sample_size, len(train_ds))
    picks = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    sample = _TransformedSplit(train_ds.select(picks.tolist()), image_column, label_column, mode, to_tensor)
    pixels = torch.stack([sample[index][0] for index in range(count)])  # float in [0, 1]
    pixels = (pixels * 255).round().to(torch.uint8)
    mean, std = _mean_std(*_pixel_sums(pixels), image_size * image_size)
    labels = torch.from_numpy(np.array(_arrow_column(train_ds, label_column).to_numpy(), dtype=np.int64))
    class_names = _class_names(train_ds.features[label_column], labels)
    return DatasetInfo(
        name=name,
        num_classes=len(class_names),
        class_names=class_names,
        channels=channels,
        image_size=(image_size, image_size),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------------
# TEMPORARY shim of the data package's interface (replaced when the data package lands)


class _MemoryTrain:
    def __init__(self, split, augment, *, batch_size, num_replicas, rank, seed, device):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.sampler = ShardedBatchSampler(len(split), batch_size, num_replicas=num_replicas, rank=rank, seed=seed)
        self.augment, self.device, self.batch_size = augment, device, batch_size

    def __len__(self):
        return len(self.sampler)

    def epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch)
        order = torch.cat(list(self.sampler)).to(self.device, non_blocking=True) if len(self) else None
        for b in range(start, len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.augment(self.images.index_select(0, index), self.labels.index_select(0, index))


class _MemoryEval:
    def __init__(self, split, info, *, batch_size, num_replicas, rank, device):
        n = len(split)
        shard = torch.arange(n)[rank::num_replicas]
        per_rank = math.ceil(n / num_replicas)
        self.num_batches = math.ceil(per_rank / batch_size)
        padded = torch.zeros(self.num_batches * batch_size, dtype=torch.long)
        valid = torch.zeros(self.num_batches * batch_size, dtype=torch.bool)
        padded[: len(shard)], valid[: len(shard)] = shard, True
        self.index, self.valid = padded.to(device), valid.to(device)
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.info, self.batch_size, self.num_samples = info, batch_size, n

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        from cifar_train.augment import normalize

        for b in range(self.num_batches):
            index = self.index[b * self.batch_size : (b + 1) * self.batch_size]
            valid = self.valid[b * self.batch_size : (b + 1) * self.batch_size]
            images = normalize(self.images.index_select(0, index), self.info.mean, self.info.std)
            yield images, self.labels.index_select(0, index), valid


@dataclass
class TrainingData:
    info: DatasetInfo
    pipeline: str
    train: Any = None
    val: Any = None

    def train_batches(self, augment, *, batch_size, num_replicas, rank, seed, device):
        return _MemoryTrain(
            self.train, augment, batch_size=batch_size, num_replicas=num_replicas, rank=rank, seed=seed, device=device
        )

    def val_batches(self, *, batch_size, num_replicas, rank, device):
        return _MemoryEval(
            self.val, self.info, batch_size=batch_size, num_replicas=num_replicas, rank=rank, device=device
        )


def open_training_data(*, seed, say=print, **d):
    train, val, info = load_dataset_splits(
        d["dataset"],
        train_split=d["train_split"],
        val_split=d["val_split"] or None,
        val_fraction=d["val_fraction"],
        image_column=d["image_column"] or None,
        label_column=d["label_column"] or None,
        seed=seed,
        cache_dir=d["cache_dir"] or None,
        skip_corrupt=d["skip_corrupt"],
    )
    if d["train_limit"]:
        train = DecodedSplit(train.images[: d["train_limit"]], train.labels[: d["train_limit"]])
    return TrainingData(info, "memory", train, val)


def describe_dataset(dataset, *, train_split="train", val_split="test", image_column=None, label_column=None):
    """TEMPORARY shim: what can be known without writing anything."""
    if dataset in DATASET_ALIASES or ("/" in dataset and not Path(dataset).exists()):
        return {"reachable": False, "reason": "offline shim"}
    return {"reachable": True, "layout": "local", "splits": {}}
