"""The `[data]` section's one entry point for training: check it, open the data, hand out batch sources.

`check_data` applies the rules that need no data (cheap: no dataset access, no `datasets` import).
`open_training_data` resolves the dataset, chooses the pipeline, decodes (cached) or opens the splits for
streaming, applies `val_fraction` and `train_limit`, prints one summary line per split, and returns a
`TrainingData` whose `train_batches` / `val_batches` build each rank's batch sources.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cifar_train.errors import UserError
from cifar_train.schema import Findings

if TYPE_CHECKING:  # (the modules themselves import torch: check_data must stay light)
    import torch

    from cifar_train.data.batches import EvalBatches, TrainBatches
    from cifar_train.data.info import DatasetInfo

__all__ = ["TrainingData", "check_data", "open_training_data"]

_STREAMING_ONLY = {
    "data.image_size": "the crop size of the streaming pipeline; decoded images keep their size",
    "data.eval_resize": "the evaluation resize of the streaming pipeline",
    "data.min_scale": "RandomResizedCrop's smallest area share, streaming pipeline only",
    "data.num_workers": "DataLoader workers of the streaming pipeline; decoded batches are sliced on the device",
    "data.streaming_source": "datasets' streaming mode, for the streaming pipeline",
    "data.shuffle_buffer": "the shuffle buffer of data.streaming_source",
}
_MEMORY_ONLY = {
    "data.cache_dir": "the decode cache of the memory pipeline; streamed images are decoded per sample",
    "data.skip_corrupt": "checked while decoding into memory; streaming reads images as it goes",
}
_STREAMING_NEEDS_SPLIT = 'needs a named data.val_split (e.g. "validation") rather than a held-out data.val_fraction'


def check_data(
    *,
    dataset: str,
    train_split: str,
    val_split: str | None,
    val_fraction: float,
    train_limit: int,
    image_column: str | None,
    label_column: str | None,
    pipeline: str,
    num_workers: int,
    image_size: int,
    eval_resize: int,
    min_scale: float,
    streaming_source: bool,
    shuffle_buffer: int,
    cache_dir: str | None,
    skip_corrupt: bool,
) -> Findings:
    """Raise `UserError` on `[data]` settings that contradict; return the settings that have no effect."""
    from cifar_train.data.source import known_pipeline  # light: names only, no torch

    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction = {val_fraction!r} is out of range; use a value in [0, 1)")
    if val_split and val_fraction > 0:
        raise UserError(
            f"data.val_split = {val_split!r} and data.val_fraction = {val_fraction} contradict; "
            'set data.val_split = "" to hold out a fraction of train, or data.val_fraction = 0'
        )
    if not val_split and val_fraction == 0:
        raise UserError('data.val_split = "" (hold out part of train) needs data.val_fraction > 0, e.g. 0.1')
    if streaming_source and pipeline == "memory":
        raise UserError(
            'data.streaming_source = true and data.pipeline = "memory" contradict: datasets\' streaming mode feeds '
            'the streaming pipeline; set data.pipeline = "streaming" (or "auto")'
        )
    streams = pipeline == "streaming" or streaming_source
    what = "data.streaming_source = true" if streaming_source else 'data.pipeline = "streaming"'
    if streams and not val_split:
        raise UserError(f"{what} {_STREAMING_NEEDS_SPLIT}")
    if streams and train_limit:
        raise UserError('data.train_limit works with the in-memory pipeline only (data.pipeline = "memory")')
    if eval_resize < image_size:
        raise UserError(f"data.eval_resize = {eval_resize} must be >= data.image_size = {image_size}")
    effective = "streaming" if streaming_source else pipeline if pipeline != "auto" else known_pipeline(dataset)
    findings = Findings()
    if effective == "memory":
        findings.ignored.update(_STREAMING_ONLY)
    elif effective == "streaming":
        findings.ignored.update(_MEMORY_ONLY)
        if not streaming_source:
            findings.ignored["data.shuffle_buffer"] = _STREAMING_ONLY["data.shuffle_buffer"]
        cores = os.cpu_count() or 1
        if num_workers > cores:
            findings.warnings.append(f"data.num_workers = {num_workers} is more than the {cores} CPU cores here")
    return findings


@dataclass
class TrainingData:
    """The opened data: what it is (`info`), how it flows (`pipeline`), and each rank's batch sources."""

    info: DatasetInfo
    pipeline: str  # "memory" | "streaming"
    _train: Callable[..., TrainBatches] = field(repr=False)
    _val: Callable[..., EvalBatches] = field(repr=False)

    def train_batches(
        self, augment: Any, *, batch_size: int, num_replicas: int, rank: int, seed: int, device: torch.device | str
    ) -> TrainBatches:
        """This rank's `TrainBatches`: `augment` is a `cifar_train.augment.BatchAugment`; `batch_size` per rank."""
        return self._train(
            augment, batch_size=batch_size, num_replicas=num_replicas, rank=rank, seed=seed, device=device
        )

    def val_batches(self, *, batch_size: int, num_replicas: int, rank: int, device: torch.device | str) -> EvalBatches:
        """This rank's `EvalBatches`: fixed-size batches with a `valid` mask; `batch_size` per rank."""
        return self._val(batch_size=batch_size, num_replicas=num_replicas, rank=rank, device=device)


def open_training_data(
    *,
    dataset: str,
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
    streaming_source: bool = False,
    shuffle_buffer: int = 2000,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt: bool = False,
    seed: int = 0,
    say: Callable[[str], None] = print,
    classes: Sequence[str] | None = None,
) -> TrainingData:
    """Open the data a run trains on (the `[data]` keys, the run's seed, a printer for the summary lines).

    `classes`: the classes the model already predicts (a resumed run's); the data's labels are matched to them
    by name, and a class the model does not know is refused. Call it in `accelerator.main_process_first()`: the
    main process decodes and caches, the others read.
    """
    from cifar_train.data.decoded import DatasetSource
    from cifar_train.data.streaming import choose_pipeline

    check_data(
        dataset=dataset,
        train_split=train_split,
        val_split=val_split,
        val_fraction=val_fraction,
        train_limit=train_limit,
        image_column=image_column,
        label_column=label_column,
        pipeline=pipeline,
        num_workers=num_workers,
        image_size=image_size,
        eval_resize=eval_resize,
        min_scale=min_scale,
        streaming_source=streaming_source,
        shuffle_buffer=shuffle_buffer,
        cache_dir=None if cache_dir is None else str(cache_dir),
        skip_corrupt=skip_corrupt,
    )
    val_split, image_column, label_column = val_split or None, image_column or None, label_column or None
    source = DatasetSource(dataset, cache_dir)
    columns = dict(image_column=image_column, label_column=label_column)
    streaming = dict(image_size=image_size, eval_resize=eval_resize, min_scale=min_scale, num_workers=num_workers)
    if streaming_source:
        return _source_stream_data(
            source, train_split, val_split, columns, streaming, shuffle_buffer, seed=seed, say=say, classes=classes
        )
    chosen = choose_pipeline(source, pipeline=pipeline, train_split=train_split, skip_corrupt=skip_corrupt, **columns)
    if chosen == "streaming":
        return _streaming_data(
            source, train_split, val_split, train_limit, columns, streaming, seed=seed, say=say, classes=classes
        )
    splits = dict(train_split=train_split, val_split=val_split, val_fraction=val_fraction, train_limit=train_limit)
    return _memory_data(source, splits, columns, seed=seed, skip_corrupt=skip_corrupt, say=say, classes=classes)


def _memory_data(source, splits: dict, columns: dict, *, seed, skip_corrupt, say, classes) -> TrainingData:
    """The in-memory pipeline: the splits decoded (or read from the decode cache) into uint8 tensors."""
    from cifar_train.data.batches import MemoryEvalBatches, MemoryTrainBatches
    from cifar_train.data.decoded import load_splits

    train, val, info = load_splits(source, seed=seed, skip_corrupt=skip_corrupt, say=say, **splits, **columns)
    if classes is not None:
        train, val, info = _with_classes(train, val, info, classes)
    return TrainingData(
        info,
        "memory",
        functools.partial(MemoryTrainBatches, train),
        functools.partial(MemoryEvalBatches, val, mean=info.mean, std=info.std),
    )


def _with_classes(train: Any, val: Any, info: DatasetInfo, classes: Sequence[str]) -> tuple[Any, Any, DatasetInfo]:
    """Decoded splits relabelled to `classes` (matched by name) and the info that says so."""
    import dataclasses

    import torch

    from cifar_train.data.classes import class_map
    from cifar_train.data.decoded import DecodedSplit

    mapping = class_map(info.class_names, classes, what="the dataset's classes", target_what=_CHECKPOINT_CLASSES)
    if mapping is None:
        return train, val, info
    lookup = torch.from_numpy(mapping)
    relabel = [DecodedSplit(split.images, lookup[split.labels]) for split in (train, val)]
    return *relabel, dataclasses.replace(info, class_names=list(classes), num_classes=len(classes))


_CHECKPOINT_CLASSES = "those the run's checkpoint was trained on"


def _streaming_data(
    source: Any,
    train_split: str,
    val_split: str | None,
    train_limit: int,
    columns: dict[str, str | None],
    options: dict[str, Any],  # image_size, eval_resize, min_scale, num_workers
    *,
    seed: int,
    say: Callable[[str], None],
    classes: Sequence[str] | None,
) -> TrainingData:
    from cifar_train.data.info import summary_line
    from cifar_train.data.streaming import StreamingEvalBatches, StreamingSplit, StreamingTrainBatches, streaming_info

    where = f"data.dataset {source.shown!r} streams (too large to decode into memory, or of mixed image sizes)"
    if val_split is None:
        raise UserError(f"{where}, which {_STREAMING_NEEDS_SPLIT}")
    if train_limit:
        raise UserError(f'{where}; data.train_limit works with the in-memory pipeline only (data.pipeline = "memory")')
    known = dict(classes=classes, classes_of=_CHECKPOINT_CLASSES) if classes is not None else {}
    train = StreamingSplit.open(source, train_split, setting="data.train_split", **columns, **known)
    picked = dict(image_column=train.image_column, label_column=train.label_column)
    those = f"those of split {train_split!r}"
    val = StreamingSplit.open(
        source, val_split, setting="data.val_split", classes=train.class_names, classes_of=those, **picked
    )
    info = streaming_info(train, image_size=options["image_size"], eval_resize=options["eval_resize"], seed=seed)
    how = f"streaming (mean/std of {min(2048, len(train.rows)):,} training images, centre crops)"
    for split in (train, val):
        shape = (info.channels, *info.image_size)
        count, classes = len(split.rows), info.num_classes
        say(
            summary_line(
                info.name,
                split.split,
                images=count,
                num_classes=classes,
                shape=shape,
                mean=info.mean,
                std=info.std,
                how=how,
            )
        )
    workers = options["num_workers"]
    train_options = dict(mean=info.mean, std=info.std, image_size=options["image_size"], min_scale=options["min_scale"])
    return TrainingData(
        info,
        "streaming",
        functools.partial(StreamingTrainBatches, train, num_workers=workers, **train_options),
        functools.partial(StreamingEvalBatches, val, data_config=info.data_config, num_workers=workers, seed=seed),
    )


def _source_stream_data(
    source: Any,
    train_split: str,
    val_split: str,
    columns: dict[str, str | None],
    options: dict[str, Any],  # image_size, eval_resize, min_scale, num_workers
    shuffle_buffer: int,
    *,
    seed: int,
    say: Callable[[str], None],
    classes: Sequence[str] | None,
) -> TrainingData:
    """`data.streaming_source`: train read in `datasets`' streaming mode, validation opened alone (`iterable.py`)."""
    from cifar_train.data.info import DatasetInfo, summary_line
    from cifar_train.data.iterable import IterableTrainBatches, SourceStream
    from cifar_train.data.source import open_one_split
    from cifar_train.data.streaming import StreamingEvalBatches, StreamingSplit, crop_statistics, eval_crops

    train = SourceStream.open(source, train_split, **columns)
    names = list(classes) if classes is not None else train.class_names
    picked = dict(image_column=train.image_column, label_column=train.label_column)
    val = StreamingSplit.open(
        open_one_split(source, val_split, "data.val_split"),
        val_split,
        setting="data.val_split",
        classes=names,
        classes_of=f"those of split {train_split!r}",
        **picked,
    )
    size, resize, sample = options["image_size"], options["eval_resize"], min(2048, train.num_rows)
    crops = eval_crops(train.channels, size, resize)
    images = (crops(image) for image in train.sample(sample, seed))
    mean, std = crop_statistics(_chunks(images, 256))
    info = DatasetInfo(
        name=train.name,
        num_classes=len(names),
        class_names=names,
        channels=train.channels,
        image_size=(size, size),
        mean=mean,
        std=std,
        eval_resize=resize,
    )
    how = f"streamed from the source (mean/std of the first {sample:,} shuffled training images, centre crops)"
    for split, count in ((train.split, train.num_rows), (val.split, len(val.rows))):
        say(
            summary_line(
                info.name,
                split,
                images=count,
                num_classes=info.num_classes,
                shape=(info.channels, size, size),
                mean=mean,
                std=std,
                how=how,
            )
        )
    workers = options["num_workers"]
    return TrainingData(
        info,
        "streaming",
        functools.partial(
            IterableTrainBatches,
            train,
            mean=mean,
            std=std,
            image_size=size,
            min_scale=options["min_scale"],
            num_workers=workers,
            shuffle_buffer=shuffle_buffer,
            classes=classes,
        ),
        functools.partial(StreamingEvalBatches, val, data_config=info.data_config, num_workers=workers, seed=seed),
    )


def _chunks(items: Any, size: int) -> Any:
    """Lists of up to `size` consecutive `items`."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
