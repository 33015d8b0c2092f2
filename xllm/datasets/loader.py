"""Data loaders: the collator runs in the workers, and a training order that a resumed run can re-enter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from xllm.common import dist


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), sharded across ranks, that can start part-way for a resume."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed = length, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=generator).tolist()[dist.rank():: dist.world_size()]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


def training_loader(dataset: Dataset, collator: Callable, batch_size: int, seed: int,
                    num_workers: int = 0) -> DataLoader:
    """Shuffled by ``EpochSampler`` (streamed datasets keep their own order); incomplete last batches dropped."""
    sampler = None if isinstance(dataset, IterableDataset) else EpochSampler(len(dataset), seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      num_workers=num_workers, drop_last=True)


def evaluation_loader(dataset: Dataset, collator: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
