"""The order of an epoch: one seeded permutation shared by every rank, cut into disjoint per-rank shards."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["ShardedBatchSampler", "check_shard"]


def check_shard(batch_size: int, num_replicas: int, rank: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got rank={rank}")


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
        check_shard(batch_size, num_replicas, rank)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.num_replicas)
        largest_shard = math.ceil(self.num_samples / self.num_replicas)
        return math.ceil(largest_shard / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of all samples, the same on every rank (identity without `shuffle`)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's indices for the whole epoch, batch after batch: `(len(self) * batch_size,)` (`drop_last`)."""
        if not self.drop_last:
            raise ValueError("shard() cuts full batches; with drop_last=False iterate batches() instead")
        steps, size = len(self), self.batch_size
        global_batches = self.order(epoch)[: steps * size * self.num_replicas].view(steps, self.num_replicas, size)
        return global_batches[:, self.rank].reshape(-1)

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """The epoch's batches of indices for this rank, from batch `start` on (resuming mid-epoch)."""
        if self.drop_last:
            yield from self.shard(epoch).view(len(self), self.batch_size)[start:]
            return
        shard = self.order(epoch)[self.rank :: self.num_replicas]
        for step in range(start, len(self)):
            yield shard[step * self.batch_size : (step + 1) * self.batch_size]
