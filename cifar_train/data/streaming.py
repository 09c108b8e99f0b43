"""Which pipeline a dataset takes, and the streaming one: per-sample timm transforms in `DataLoader` workers.

`choose_pipeline` is the one place that decides: known small datasets (CIFAR, the MNIST family, digits)
and anything already in the decode cache go to memory, ImageNet streams, and anything else is probed
(a few images' sizes and the row count: memory when one size fits in `max_memory_bytes`).

Streaming decodes and transforms each sample in the loader's workers through `Dataset.with_transform`
(RandomResizedCrop + flip for training, the run's resize + centre crop for evaluation: `transforms.py`) into
uint8 tensors; the batches go to the device (pinned memory on CUDA, persistent workers, each prefetching two
batches) and are normalised there, as timm's own prefetching loader does, before the batch-level steps
(`BatchAugment.normalized`). Per-sample randomness draws from the workers' seeded RNGs: do not expect
bit-exact resume here (`data.streaming_source`, `iterable.py`, seeds each image by its place and does resume
exactly).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from cifar_train import wording
from cifar_train.data.batches import eval_block, pad_batch
from cifar_train.data.classes import class_map
from cifar_train.data.decode import image_format, open_image, to_8bit
from cifar_train.data.decoded import DatasetSource
from cifar_train.data.info import DatasetInfo, mean_std
from cifar_train.data.sampler import ShardedBatchSampler
from cifar_train.data.source import (
    detect_columns,
    known_pipeline,
    pick_split,
    split_classes,
    split_records,
)
from cifar_train.data.transforms import data_config, eval_transform, train_transform
from cifar_train.errors import UserError

__all__ = [
    "StreamingEvalBatches",
    "StreamingSplit",
    "StreamingTrainBatches",
    "choose_pipeline",
    "streaming_info",
]

_PROBE_IMAGES = 8
MAX_MEMORY_BYTES = 8 * 1024**3  # decoded uint8 size above which "auto" streams


def choose_pipeline(
    dataset: str | DatasetSource,
    *,
    pipeline: str = "auto",
    train_split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    skip_corrupt: bool = False,
    cache_dir: str | os.PathLike | None = None,
    max_memory_bytes: int = MAX_MEMORY_BYTES,
    setting: str = "data.train_split",  # what named `train_split`, for messages (evaluation: its --split)
) -> str:
    """`pipeline`, with "auto" resolved to "memory" or "streaming" (see the module's docstring)."""
    if pipeline != "auto":
        return pipeline
    known = known_pipeline(dataset.given if isinstance(dataset, DatasetSource) else dataset)
    if known is not None:
        return known
    source = dataset if isinstance(dataset, DatasetSource) else DatasetSource(dataset, cache_dir)
    if source.cached(train_split, image_column, label_column, skip_corrupt) is not None:
        return "memory"  # decoded before: it fits
    rows = pick_split(source.splits, train_split, setting)
    image_column, _ = detect_columns(rows.features, image_column, label_column)
    shapes = set()
    for record in split_records(rows, image_column, 0, min(_PROBE_IMAGES, len(rows))):
        try:
            shapes.add(image_format(open_image(record))[1:])
        except (OSError, SyntaxError, ValueError):
            continue  # a corrupt image is reported (or skipped) by the decoding that follows
    if len(shapes) > 1:
        return "streaming"
    if not shapes:
        return "memory"
    channels, height, width = shapes.pop()
    return "memory" if len(rows) * channels * height * width <= max_memory_bytes else "streaming"


@dataclass
class StreamingSplit:
    """One split opened for streaming: its rows (the image column and our class indices), classes, image mode."""

    name: str  # the resolved dataset
    split: str
    rows: Any  # datasets.Dataset with the image column and "label" (int64 class indices)
    image_column: str
    label_column: str  # the dataset's own label column the classes came from
    mode: str  # "RGB" or "L": every image is converted to the first one's
    class_names: list[str]

    @classmethod
    def open(
        cls,
        source: DatasetSource,
        split: str,
        *,
        setting: str,
        image_column: str | None,
        label_column: str | None,
        classes: Sequence[str] | None = None,
        classes_of: str = "",
    ) -> StreamingSplit:
        """Open `split`; with `classes` (another split's), its labels are matched to them by name."""
        rows = pick_split(source.splits, split, setting)
        image_column, label_column = detect_columns(rows.features, image_column, label_column)
        if len(rows) == 0:
            raise UserError(f"{setting}: split {split!r} of {source.shown!r} holds no images")
        mode = _split_mode(rows, image_column)
        where = f"{wording.setting('data.label_column')} {label_column!r} of split {split!r}"
        labels, names = split_classes(rows, label_column, where)
        if classes is not None:
            mapping = class_map(names, classes, what=f"the classes of split {split!r}", target_what=classes_of)
            labels, names = (labels if mapping is None else mapping[labels]), list(classes)
        rows = rows.select_columns([image_column]).add_column(_LABELS, labels)
        return cls(source.shown, split, rows, image_column, label_column, mode, names)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def transformed(self, transform: Any, rows: Any = None) -> Any:
        """The rows as a map-style dataset of `{"image": tensor, "label": int}`, decoded and transformed lazily."""
        rows = self.rows if rows is None else rows
        return rows.with_transform(_Transform(self.image_column, self.mode, transform))


def _split_mode(rows: Any, image_column: str, probes: int = 64) -> str:
    """ "L" when every probed image (spread over the split) is grayscale, else "RGB": one grayscale image first
    must not make a colour dataset grayscale."""
    picks = sorted({round(i * (len(rows) - 1) / max(probes - 1, 1)) for i in range(min(probes, len(rows)))})
    modes = set()
    for index in picks:
        try:
            modes.add(image_format(open_image(split_records(rows, image_column, index, index + 1)[0]))[0])
        except (OSError, SyntaxError, ValueError):
            continue  # a corrupt image fails where it is read
    return "L" if modes == {"L"} else "RGB"


_LABELS = "__cifar_recipes_label"  # our int64 class indices, beside the dataset's image column


class _Transform:
    """`with_transform`'s function: a batch of rows -> converted, transformed images (picklable for workers)."""

    def __init__(self, image_column: str, mode: str, transform: Any) -> None:
        self.image_column, self.mode, self.transform = image_column, mode, transform

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [to_8bit(image, self.mode) for image in batch[self.image_column]]
        return {"image": [self.transform(image) for image in images], "label": batch[_LABELS]}


def streaming_info(
    train: StreamingSplit,
    *,
    image_size: int = 224,  # pixels; statistics are taken on the evaluation transform's centre crops
    eval_resize: int = 256,  # pixels
    sample_size: int = 2048,  # training images sampled for mean and std
    seed: int = 0,
) -> DatasetInfo:
    """`DatasetInfo` for the streaming path; mean and std come from a seeded sample of training images."""
    count = min(sample_size, len(train.rows))
    picks = torch.randperm(len(train.rows), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    sample = train.transformed(eval_crops(train.channels, image_size, eval_resize), train.rows.select(picks.tolist()))
    mean, std = crop_statistics(sample[start : start + 256]["image"] for start in range(0, count, 256))
    return DatasetInfo(
        name=train.name,
        num_classes=train.num_classes,
        class_names=train.class_names,
        channels=train.channels,
        image_size=(image_size, image_size),
        mean=mean,
        std=std,
        eval_resize=eval_resize,
    )


def eval_crops(channels: int, image_size: int, eval_resize: int) -> Any:
    """The evaluation transform's resize and centre crop, as uint8 tensors (no normalisation)."""
    config = data_config(
        channels=channels,
        image_size=(image_size, image_size),
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        eval_resize=eval_resize,
    )
    return eval_transform(config, normalize=False)


def crop_statistics(chunks: Iterable[Sequence[torch.Tensor]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 crops (C, H, W), given a chunk at a time (bounded memory)."""
    sums, squares, pixels = [], [], 0
    for chunk in chunks:
        values = torch.stack(list(chunk)).to(torch.int64).flatten(2)  # uint8 0-255, exact in int64
        sums.append(values.sum(2))
        squares.append(values.square().sum(2))
        pixels = values.shape[2]
    return mean_std(torch.cat(sums), torch.cat(squares), pixels)


class _EpochView:
    """The loader's batch sampler: one epoch of a `ShardedBatchSampler`, chosen before each pass."""

    def __init__(self, sampler: ShardedBatchSampler) -> None:
        self.sampler, self.epoch, self.start = sampler, 0, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (batch.tolist() for batch in self.sampler.batches(self.epoch, self.start))

    def __len__(self) -> int:
        return len(self.sampler) - self.start


def _loader(dataset: Any, num_workers: int, **options: Any) -> DataLoader:
    return DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        **options,
    )


class StreamingTrainBatches:
    """Training batches: RandomResizedCrop + flip in the workers, normalisation on the device, `augment.normalized`."""

    def __init__(
        self,
        split: StreamingSplit,
        augment: Any,  # a cifar_train.augment.BatchAugment
        *,
        batch_size: int,  # per rank
        num_replicas: int,
        rank: int,
        seed: int,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,  # pixels
        min_scale: float,
        num_workers: int,
    ) -> None:
        from cifar_train.normalize import Normalize

        hflip = getattr(augment, "hflip", True)
        transform = train_transform(channels=split.channels, image_size=image_size, min_scale=min_scale, hflip=hflip)
        if getattr(augment, "uses_sample_index", False):
            raise UserError("augment.alternating_flip needs the in-memory pipeline; streamed images flip at random")
        sampler = ShardedBatchSampler(
            len(split.rows), batch_size, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=True, drop_last=True
        )
        self._view = _EpochView(sampler)
        self.loader = _loader(split.transformed(transform), num_workers, batch_sampler=self._view)
        self.augment, self.device = augment, torch.device(device)
        self._normalize = Normalize(mean, std, self.device)

    def __len__(self) -> int:
        return len(self._view.sampler)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._view.epoch, self._view.start = epoch, start
        for batch in self.loader:
            images = self._normalize(batch["image"].to(self.device, non_blocking=True))  # uint8 from the workers
            yield self.augment.normalized(images, batch["label"].to(self.device, non_blocking=True))


class StreamingEvalBatches:
    """Evaluation batches: the run's evaluation transform (resize and crop in the workers, normalisation on the
    device: bit for bit timm's `create_transform` of the same config); fixed size, padded, masked."""

    def __init__(
        self,
        split: StreamingSplit,
        *,
        data_config: Mapping[str, Any],  # timm's data config of the evaluation transform (`transforms.py`)
        batch_size: int,  # per rank
        num_replicas: int = 1,
        rank: int = 0,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        from cifar_train.normalize import Normalize

        transform = eval_transform(data_config, normalize=False)
        self.num_samples = len(split.rows)
        start, stop, self.num_batches = eval_block(self.num_samples, batch_size, num_replicas, rank)
        block = split.transformed(transform, split.rows.select(range(start, stop)))
        # Its own generator: iterating draws worker seeds, which must not come from the training RNG stream.
        generator = torch.Generator().manual_seed(seed)
        self.loader = _loader(block, num_workers, batch_size=batch_size, shuffle=False, generator=generator)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.shape = tuple(data_config["input_size"])
        self._normalize = Normalize(data_config["mean"], data_config["std"], self.device)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        size, done = self.batch_size, 0
        for batch in self.loader:
            count = len(batch["label"])
            images = self._normalize(pad_batch(batch["image"], size).to(self.device, non_blocking=True))
            labels = pad_batch(batch["label"], size).to(self.device, non_blocking=True)
            yield images, labels, (torch.arange(size) < count).to(self.device, non_blocking=True)
            done += 1
        for _ in range(done, self.num_batches):  # a rank with fewer samples still runs every batch
            images = torch.zeros((size, *self.shape), device=self.device)
            yield images, torch.zeros(size, dtype=torch.int64, device=self.device), images.new_zeros(size, dtype=bool)
