"""Datasets from the Hugging Face Hub or a local copy: decoded once into uint8 tensors, or streamed.

`data.dataset` is a Hub id, one of the `DATASET_ALIASES`, or a local folder: the Hub's parquet layout, an
`imagefolder` tree (one sub-folder per class) or a `save_to_disk` folder. One owner per concern:

    local.py      a local folder's one-walk scan: file signature, layout, imagefolder listing, idx files
    source.py     resolve (alias / Hub id / path), open as a DatasetDict, splits, column detection
    decode.py     encoded images -> uint8 (N, C, H, W) on every core, with a progress bar
    cache.py      the decode cache: one memory-mapped file per split, written atomically
    decoded.py    decoded splits: cache lookup by signature, held-out fraction, stratified train_limit,
                  statistics, summary lines (`load_dataset_splits`, `load_split`)
    info.py       `DatasetInfo`, mean/std from pixel sums, the summary line
    sampler.py    `ShardedBatchSampler`: the epoch's seeded permutation, per-rank shards
    batches.py    the in-memory batch sources (`TrainBatches`, `EvalBatches` on the device)
    transforms.py timm's transforms, and the run's one evaluation transform as timm's data config
    streaming.py  `choose_pipeline`, and the streaming batch sources (timm transforms via `with_transform`)
    iterable.py   data larger than the disk: training through `datasets`' streaming mode (`IterableDataset`)
    training.py   `check_data` and `open_training_data`: the `[data]` section's entry point for training
    describe.py   `describe_dataset`: what a dataset is, without writing or downloading anything

Names are imported on first use, so `from cifar_train.data import check_data` stays light (no torch)
and the decoding workers start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DATASET_ALIASES": "source",
    "DatasetInfo": "info",
    "DatasetSource": "decoded",
    "DecodedSplit": "decoded",
    "EvalBatches": "batches",
    "IterableTrainBatches": "iterable",
    "MemoryEvalBatches": "batches",
    "MemoryTrainBatches": "batches",
    "ShardedBatchSampler": "sampler",
    "StreamingEvalBatches": "streaming",
    "StreamingSplit": "streaming",
    "StreamingTrainBatches": "streaming",
    "TrainBatches": "batches",
    "TrainingData": "training",
    "check_data": "training",
    "choose_pipeline": "streaming",
    "default_cache_dir": "source",
    "known_pipeline": "source",
    "describe_dataset": "describe",
    "load_dataset_splits": "decoded",
    "load_split": "decoded",
    "open_one_split": "source",
    "open_training_data": "training",
    "resolve_dataset": "source",
    "stratified_subset": "decoded",
    "streaming_info": "streaming",
}

__all__ = [
    "DATASET_ALIASES",
    "DatasetInfo",
    "DatasetSource",
    "DecodedSplit",
    "EvalBatches",
    "IterableTrainBatches",
    "MemoryEvalBatches",
    "MemoryTrainBatches",
    "ShardedBatchSampler",
    "StreamingEvalBatches",
    "StreamingSplit",
    "StreamingTrainBatches",
    "TrainBatches",
    "TrainingData",
    "check_data",
    "choose_pipeline",
    "default_cache_dir",
    "describe_dataset",
    "load_dataset_splits",
    "load_split",
    "open_one_split",
    "open_training_data",
    "resolve_dataset",
    "stratified_subset",
    "streaming_info",
]

if TYPE_CHECKING:
    from .batches import EvalBatches, MemoryEvalBatches, MemoryTrainBatches, TrainBatches
    from .decoded import DatasetSource, DecodedSplit, load_dataset_splits, load_split, stratified_subset
    from .describe import describe_dataset
    from .info import DatasetInfo
    from .iterable import IterableTrainBatches
    from .sampler import ShardedBatchSampler
    from .source import DATASET_ALIASES, default_cache_dir, open_one_split, resolve_dataset
    from .streaming import StreamingEvalBatches, StreamingSplit, StreamingTrainBatches, choose_pipeline, streaming_info
    from .training import TrainingData, check_data, open_training_data


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # found directly next time
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
