"""Batch sources of decoded in-memory data, on the training device, with no host read per batch.

`TrainBatches` and `EvalBatches` are the two shapes the training loop consumes; the memory pipeline's
implementations live here, the streaming pipeline's in `cifar_train.data.streaming`.

Training: the uint8 images and labels live on the device; each epoch's index shard (see
`ShardedBatchSampler`) goes to the device once, and every batch is a slice of it -> `index_select` ->
`augment`. Evaluation: each rank takes a contiguous block of the split; every batch has exactly
`batch_size` rows (the last one padded with zeros) and a `valid` mask, so every rank runs the same number
of equally shaped batches and, over all ranks, each sample is valid exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from cifar_train.data.decoded import DecodedSplit
from cifar_train.data.sampler import ShardedBatchSampler, check_shard

__all__ = ["EvalBatches", "MemoryEvalBatches", "MemoryTrainBatches", "TrainBatches", "eval_block", "pad_batch"]

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainBatches(Protocol):
    def __len__(self) -> int:
        """Full batches per epoch for this rank (the last partial global batch is dropped)."""

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's augmented `(images, targets)` batches from batch `start` on, on the device."""


class EvalBatches(Protocol):
    num_samples: int  # images in the split, all ranks together

    def __len__(self) -> int:
        """Batches, the same on every rank."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`(float normalised images (B, C, H, W), int64 labels (B,), valid bool (B,))` on the device."""


def eval_block(num_samples: int, batch_size: int, num_replicas: int, rank: int) -> tuple[int, int, int]:
    """`(start, stop, batches)`: rank `rank`'s contiguous block of the split and the batches every rank runs."""
    check_shard(batch_size, num_replicas, rank)
    block = math.ceil(num_samples / num_replicas)
    start = min(rank * block, num_samples)
    return start, min(start + block, num_samples), math.ceil(block / batch_size)


def pad_batch(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` with zero rows appended up to `size` (the last evaluation batch)."""
    if len(rows) == size:
        return rows
    return torch.cat([rows, rows.new_zeros((size - len(rows), *rows.shape[1:]))])


class MemoryTrainBatches:
    """Training batches from decoded uint8 images on the device, augmented as whole batches."""

    def __init__(
        self,
        split: DecodedSplit,
        augment: Callable[[torch.Tensor, torch.Tensor], Batch],  # a cifar_train.augment.BatchAugment
        *,
        batch_size: int,  # per rank
        num_replicas: int,
        rank: int,
        seed: int,
        device: torch.device | str,
    ) -> None:
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.augment = augment
        self.batch_size = batch_size
        self.sampler = ShardedBatchSampler(
            len(split), batch_size, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=True, drop_last=True
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        shard = self.sampler.shard(epoch)  # seeded by seed + epoch, the same permutation on every rank
        if self.device.type == "cuda":
            shard = shard.pin_memory()
        shard = shard.to(self.device, non_blocking=True)  # once per epoch; batches are slices of it
        size = self.batch_size
        by_index = getattr(self.augment, "uses_sample_index", False)  # e.g. alternating flips
        for step in range(start, len(self)):
            index = shard[step * size : (step + 1) * size]
            images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
            yield self.augment(images, labels, index=index, epoch=epoch) if by_index else self.augment(images, labels)


class MemoryEvalBatches:
    """Evaluation batches of decoded uint8 images on the device, normalised per batch with `mean`/`std`."""

    def __init__(
        self,
        split: DecodedSplit,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,  # per rank
        num_replicas: int = 1,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        from cifar_train.normalize import Normalize

        self._normalize = Normalize(mean, std, device)  # its constants go to the device once, not per batch
        self.num_samples = len(split)
        start, stop, self.num_batches = eval_block(len(split), batch_size, num_replicas, rank)
        self.batch_size = batch_size
        self.images = split.images[start:stop].to(device)
        self.labels = split.labels[start:stop].to(device)
        self.valid = torch.arange(self.num_batches * batch_size, device=device) < stop - start

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        size = self.batch_size
        for step in range(self.num_batches):
            rows = slice(step * size, (step + 1) * size)
            images = pad_batch(self.images[rows], size)
            yield self._normalize(images), pad_batch(self.labels[rows], size), self.valid[rows]
