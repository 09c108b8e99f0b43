"""Data larger than the disk: the training split read through `datasets`' streaming mode.

With `data.streaming_source = true` (streaming pipeline) the training split is a `datasets.IterableDataset`
(`load_dataset(..., streaming=True)`, from the Hub or a local folder of parquet shards): its rows are read
shard by shard while training runs and nothing is written to disk first. The validation split is opened alone
(`source.open_one_split`: only its own files are read or downloaded) and goes through the map-style streaming
pipeline, as `evaluate.py` reads it, so validation, evaluation and the export share one transform.

An epoch (`IterableTrainBatches`):

- each process has S = min(data.num_workers, shards) readers (DataLoader workers; one in the main process when
  `num_workers = 0`); reader r takes every S-th shard (`IterableDataset.shard`), and of those, this process's
  part (`datasets.distributed.split_dataset_by_node`: whole shards when they divide evenly over the processes,
  otherwise every W-th row);
- a reader's shards are shuffled anew each epoch (seeded by `train.seed`, the reader and the epoch) and their rows
  mix in a shuffle buffer of `data.shuffle_buffer` rows, filled from one shard at a time
  (`max_buffer_input_shards=1`: when datasets interleaves several parquet shards, its reader waits 5 s for its
  threads at the end of every pass);
- every reader yields exactly P = rows // (processes x S x per-process batch) whole batches, so every process runs the
  same S x P steps; a reader whose part holds fewer rows reads it again from its start (those images repeat),
  one with more leaves the rest out of this epoch (the shard order changes with the next epoch). The loader
  hands the batches out in order, batch j from reader j mod S.

What resume means here. The order of an epoch is a function of `train.seed`, the epoch, the number of processes
and of readers; each image's augmentation (RandomResizedCrop, flip) draws from generators seeded by its place in
that order. So a run resumed at an epoch boundary, or at batch k of an epoch, trains on the same images with the
same crops in the same order as the run that was not interrupted, bit for bit (same number of processes and
`data.num_workers`). To continue at batch k each reader reads again, without decoding them, the rows of the
batches already trained in that epoch: exact, at the price of reading up to one epoch's share of rows once more.
`datasets`' own `IterableDataset.state_dict()` would continue without that reading, but the rows waiting in a
shuffle buffer at the checkpoint are lost on resume (datasets documents this), so it would be exact only with
`data.shuffle_buffer = 1`; it is not used. A run resumed with another number of processes reads each epoch in
the new layout: an epoch boundary starts the new layout's order for that epoch, and in the middle of an epoch
the batches it skips are not the images the old layout trained (some are seen twice, some not at all).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cifar_train.data.classes import class_map
from cifar_train.data.decode import image_format, open_image, to_8bit
from cifar_train.data.source import dataset_builder, detect_columns, first_line, pick_split, quiet_datasets
from cifar_train.errors import UserError
from cifar_train.wording import setting

__all__ = ["IterableTrainBatches", "SourceStream"]

_PROBE_IMAGES = 64  # rows looked at to tell a grayscale split from a colour one


@dataclass
class SourceStream:
    """The training split as a `datasets.IterableDataset` of undecoded rows, with what training needs to know."""

    name: str  # the dataset, as shown to people
    split: str
    rows: Any  # datasets.IterableDataset: the image column (undecoded) and the label column
    num_rows: int
    image_column: str
    label_column: str
    class_names: list[str]
    mode: str  # "RGB" or "L"

    @classmethod
    def open(
        cls,
        source: Any,  # a DatasetSource
        split: str,
        *,
        image_column: str | None,
        label_column: str | None,
    ) -> SourceStream:
        """Open `split` in streaming mode; its size comes from the dataset's card or its parquet files' footers."""
        import datasets

        builder = dataset_builder(source)
        files = pick_split(builder.config.data_files or {}, split, "data.train_split")
        try:
            with quiet_datasets():
                rows = datasets.load_dataset(source.name, split=split, streaming=True)
        except (ConnectionError, FileNotFoundError, ValueError) as err:
            raise UserError(f"data.dataset: cannot stream {source.shown!r}: {first_line(err)}") from err
        image_column, label_column = detect_columns(rows.features, image_column, label_column)
        feature = rows.features[label_column]
        if not isinstance(feature, datasets.ClassLabel):
            raise UserError(
                f"data.streaming_source needs a ClassLabel {setting('data.label_column')} (its classes must be known "
                f"before the split is read); column {label_column!r} of split {split!r} is not one: set "
                "data.streaming_source = false"
            )
        rows = rows.select_columns([image_column, label_column]).cast_column(image_column, datasets.Image(decode=False))
        num_rows = _num_rows(builder, split, files, source.shown)
        mode = _stream_mode(rows, image_column)
        return cls(source.shown, split, rows, num_rows, image_column, label_column, list(feature.names), mode)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def sample(self, count: int, seed: int) -> Iterator[Any]:
        """`count` images (PIL, in the split's mode) from the start of the shuffled stream: for statistics."""
        shuffled = self.rows.shuffle(seed=seed, buffer_size=max(count, 1), max_buffer_input_shards=1)
        for row in shuffled.take(count):
            yield to_8bit(open_image(_record(row[self.image_column])), self.mode)


def _record(value: dict[str, Any]) -> tuple[bytes | None, str | None]:
    return value.get("bytes"), value.get("path")


def _num_rows(builder: Any, split: str, files: Sequence[str], shown: str) -> int:
    """The split's rows: from the dataset's card where it says, else from its parquet files' footers."""
    splits = builder.info.splits or {}
    if split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    if not files or not all(str(file).endswith(".parquet") for file in files):
        raise UserError(
            f"data.streaming_source: the size of split {split!r} of {shown!r} is not known (no dataset card that "
            "says it, and not parquet files whose footers count it); the epoch length needs it"
        )
    import fsspec
    import pyarrow.parquet as pq

    total = 0
    for file in files:
        with fsspec.open(str(file), "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def _stream_mode(rows: Any, image_column: str) -> str:
    """ "L" when the first rows are all grayscale, else "RGB" (as `streaming._split_mode` for a map-style split)."""
    modes = set()
    for row in rows.take(_PROBE_IMAGES):
        try:
            modes.add(image_format(open_image(_record(row[image_column])))[0])
        except (OSError, SyntaxError, ValueError):
            continue  # a corrupt image fails where it is read
    return "L" if modes == {"L"} else "RGB"


class _Readers(torch.utils.data.IterableDataset):
    """One process's readers of the stream: whole transformed batches, run in the DataLoader's workers.

    DataLoader worker w serves reader (w + start) mod S, so that on a resumed epoch the loader's round-robin
    (which starts at worker 0) hands out batch `start` first. `position` (epoch, first batch) is shared memory
    set by the main process before each epoch: persistent workers read it when their next epoch begins.
    """

    def __init__(
        self,
        stream: SourceStream,
        *,
        readers: int,
        batches: int,  # per reader and epoch
        batch_size: int,
        seed: int,
        rank: int,
        num_replicas: int,
        shuffle_buffer: int,
        transform: Any,
        labels: np.ndarray | None,  # the stream's class index -> the model's, when they differ
    ) -> None:
        super().__init__()
        self.stream, self.readers, self.batches, self.batch_size = stream, readers, batches, batch_size
        self.seed, self.rank, self.num_replicas, self.shuffle_buffer = seed, rank, num_replicas, shuffle_buffer
        self.transform, self.labels = transform, labels
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def _rows(self, reader: int, epoch: int) -> Any:
        from datasets.distributed import split_dataset_by_node

        # The reader's shards first (the same on every process), then their order and the buffer's draws, seeded
        # per reader (and by datasets anew each epoch), then this process's part of them.
        own = self.stream.rows.shard(num_shards=self.readers, index=reader, contiguous=False)
        seed = int(np.random.SeedSequence([self.seed, reader]).generate_state(1)[0])
        shuffled = own.shuffle(seed=seed, buffer_size=self.shuffle_buffer, max_buffer_input_shards=1)
        mine = split_dataset_by_node(shuffled, rank=self.rank, world_size=self.num_replicas)
        mine.set_epoch(epoch)
        return mine

    def _batches_of(self, reader: int, epoch: int) -> Iterator[dict[str, list]]:
        """The reader's batches of raw rows, its part read again from the start when it runs out."""
        rows = self._rows(reader, epoch)
        while True:
            empty = True
            for batch in rows.iter(batch_size=self.batch_size, drop_last_batch=True):
                empty = False
                yield batch
            if empty:
                raise UserError(
                    f"data.streaming_source: reader {reader} of process {self.rank} got fewer than "
                    f"{self.batch_size} rows of split {self.stream.split!r}; use fewer data.num_workers or "
                    "processes, a smaller train.batch_size, or a split in more shards"
                )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        epoch, start = self.position.tolist()
        reader = ((info.id if info is not None else 0) + start) % self.readers
        first = max(0, -(-(start - reader) // self.readers))  # this reader's first batch at or after `start`
        batches = self._batches_of(reader, epoch)
        for index in range(self.batches):
            try:
                rows = next(batches)
            except UserError as err:  # to the main process as a value: a worker's exception comes with its traceback
                yield None, str(err)
                return
            if index < first:
                continue  # trained before the checkpoint: read again, not decoded
            yield self._transformed(rows, (self.seed, epoch, self.rank, reader, index))

    def _transformed(self, rows: dict[str, list], place: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for offset, value in enumerate(rows[self.stream.image_column]):
            image = to_8bit(open_image(_record(value)), self.stream.mode)
            with _seeded(np.random.SeedSequence([*place, offset]).generate_state(1)[0]):
                images.append(self.transform(image))
        labels = np.asarray(rows[self.stream.label_column], dtype=np.int64)
        if self.labels is not None:
            labels = self.labels[labels]
        return torch.stack(images), torch.from_numpy(labels)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's and Python's random generators seeded for one image, and put back afterwards (with
    `num_workers = 0` they are the training process's own)."""
    state = torch.random.get_rng_state(), random.getstate()
    torch.manual_seed(int(seed))
    random.seed(int(seed))
    try:
        yield
    finally:
        torch.random.set_rng_state(state[0])
        random.setstate(state[1])


class IterableTrainBatches:
    """Training batches of a `SourceStream`: timm's training transform in the readers, then `augment.normalized`."""

    def __init__(
        self,
        stream: SourceStream,
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
        shuffle_buffer: int,  # rows per reader
        classes: Sequence[str] | None = None,  # the model's classes, when they are not the stream's own
    ) -> None:
        from cifar_train.data.transforms import train_transform

        readers = max(1, min(num_workers, stream.rows.num_shards))
        from cifar_train.normalize import Normalize

        hflip = getattr(augment, "hflip", True)
        transform = train_transform(channels=stream.channels, image_size=image_size, min_scale=min_scale, hflip=hflip)
        if getattr(augment, "uses_sample_index", False):
            raise UserError("augment.alternating_flip needs the in-memory pipeline; streamed images flip at random")
        labels = None
        if classes is not None:
            what = f"the classes of split {stream.split!r}"
            labels = class_map(stream.class_names, classes, what=what, target_what="those the run's checkpoint had")
        self._readers = _Readers(
            stream,
            readers=readers,
            batches=stream.num_rows // (num_replicas * readers * batch_size),
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            num_replicas=num_replicas,
            shuffle_buffer=shuffle_buffer,
            transform=transform,
            labels=labels,
        )
        workers = readers if num_workers > 0 else 0
        self.loader = torch.utils.data.DataLoader(
            self._readers,
            batch_size=None,  # the readers make whole batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),  # worker seeds must not come from the training RNG
        )
        self.augment, self.device, self.readers = augment, torch.device(device), readers
        self._normalize = Normalize(mean, std, self.device)

    def __len__(self) -> int:
        return self._readers.readers * self._readers.batches

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._readers.position.copy_(torch.tensor([epoch, start]))
        for images, labels in self.loader:
            if images is None:
                raise UserError(labels)
            images = self._normalize(images.to(self.device, non_blocking=True))  # uint8 from the readers
            yield self.augment.normalized(images, labels.to(self.device, non_blocking=True))
