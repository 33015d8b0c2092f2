"""Data loaders: the collator runs in the workers, and a training order that a resumed run can re-enter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from xllm.common import dist


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), dealt to the ranks in turn, that can start part-way for a resume.

    ``start`` counts the samples every rank together has seen, so a run resumes with another world size at
    the same place (when the new global batch divides it)."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed = length, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        # Whole rounds only: every rank gets as many samples, so none waits for the others at the end.
        rounds = (self.length - self.start) // dist.world_size()
        return order[self.start:][dist.rank():: dist.world_size()][:rounds]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def training_loader(dataset: Dataset, collator: Callable, batch_size: int, seed: int,
                    num_workers: int = 0) -> DataLoader:
    """Shuffled by ``EpochSampler``, incomplete last batches dropped; a stream (webdataset shards) orders and
    batches itself, so that its order is the same whatever the number of workers and a resume re-enters it."""
    if isinstance(dataset, IterableDataset):
        if not hasattr(dataset, "set_position"):
            raise ValueError(f"{type(dataset).__name__}: streamed training data must come from one webdataset "
                             "dataset (several streams cannot be resumed exactly); configure one, or map-style data")
        dataset.batch_size = batch_size
        return DataLoader(dataset, batch_size=None, collate_fn=collator, num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed), collate_fn=collator,
                      num_workers=num_workers, drop_last=True)


def evaluation_loader(dataset: Dataset, collator: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
