"""A batch sampler that is deterministic, bucket-aware, sharded and resumable.

The order of an epoch is a pure function of ``(seed, epoch)``; every batch holds indices of
one bucket; with several processes each rank takes its own share of the batches. It keeps
``(epoch, consumed)`` as its state, which Lightning stores in checkpoints (through
:class:`ResumableDataLoader`), so a run resumed mid-epoch sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

# A sample key: (dataset index, epoch). The dataset derives per-sample randomness from it.
SampleKey = tuple[int, int]


class BucketBatchSampler(Sampler[list[SampleKey]]):
    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch that the training loop has used
        self._skip = 0
        self._started = False

    def _batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        by_bucket: dict[int, list[int]] = {}
        for idx, b in enumerate(self.bucket_of):
            by_bucket.setdefault(b, []).append(idx)
        batches: list[list[int]] = []
        for b in sorted(by_bucket):
            idxs = by_bucket[b]
            if self.shuffle:
                idxs = [idxs[i] for i in torch.randperm(len(idxs), generator=g).tolist()]
            for i in range(0, len(idxs), self.batch_size):
                chunk = idxs[i : i + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        # every rank gets the same number of batches (DDP steps in lockstep)
        return batches[self.rank :: self.world_size][: len(batches) // self.world_size]

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # bookkeeping happens here, not lazily, so state_dict() is right from iter() on
        if self._started and self._skip == 0:
            self.epoch += 1  # a new pass: next epoch
        self._started = True
        skip, self._skip = self._skip, 0
        self.consumed = skip
        epoch = self.epoch
        return iter([[(i, epoch) for i in batch] for batch in self._batches(epoch)[skip:]])

    def mark_consumed(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        if consumed >= len(self._batches(self.epoch)):
            # saved at the end of an epoch: the next pass starts the following one
            self.epoch += 1
            consumed = 0
        self._skip = consumed
        self.consumed = consumed
        # the next __iter__ continues this epoch instead of starting a new one
        self._started = False


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position Lightning saves in checkpoints and restores on resume."""

    def state_dict(self) -> dict[str, Any]:
        sampler = self.batch_sampler
        return sampler.state_dict() if isinstance(sampler, BucketBatchSampler) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.batch_sampler, BucketBatchSampler) and state:
            self.batch_sampler.load_state_dict(state)
