"""Data loaders: the collator runs in the workers, and a training order that a resumed run can re-enter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from xllm.common import dist
from xllm.datasets.lengths import record_lengths, record_modalities


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), dealt to the ranks in turn, that can start part-way for a resume.

    ``start`` counts the samples every rank together has seen, so a run resumes with another world size at
    the same place (when the new global batch divides it)."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed = length, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The epoch's order over every rank together."""
        return torch.randperm(self.length, generator=self._generator()).tolist()

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def _indices(self) -> list[int]:
        # Sample i of the order goes to rank i % world size: with a batch of B on each of W ranks, the W·B samples
        # from position k·W·B on are everyone's k-th batch together. Whole rounds only: every rank gets as many
        # samples, so none waits for the others at the end.
        return self.order()[self.start:][dist.rank():: dist.world_size()][:len(self)]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return max(self.length - self.start, 0) // dist.world_size()


class LengthGroupedSampler(EpochSampler):
    """``EpochSampler`` over an order in which every global batch (``global_batch`` = batch x processes samples,
    everyone's batch of one step) holds one modality and records of about one length, so its batches pad little.

    Per modality, a seeded permutation is cut into megabatches of up to 50 global batches, each sorted by length
    (transformers' ``get_length_grouped_indices``, as its Trainer's ``group_by_length`` does) and cut into
    global batches; the global batches of every modality are then shuffled together, so lengths and modalities
    follow no trend through the epoch. What is left of each modality (less than a global batch) comes last, the
    one place a batch may mix modalities. The order depends on (seed, epoch) and the global batch only, and is
    dealt as ``EpochSampler``'s: a resume re-enters it exactly with any world size that keeps the global batch."""

    def __init__(self, lengths: list[float], modalities: list[str], seed: int, global_batch: int) -> None:
        if len(lengths) != len(modalities):
            raise ValueError(f"{len(lengths)} lengths for {len(modalities)} modalities")
        super().__init__(len(lengths), seed)
        self.lengths, self.modalities, self.global_batch = lengths, modalities, global_batch

    def order(self) -> list[int]:
        # Imported here: transformers' trainer utilities take seconds to import, and only grouping needs them.
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = self._generator()
        batches, rest = [], []
        for modality in sorted(set(self.modalities)):
            members = [i for i, m in enumerate(self.modalities) if m == modality]
            grouped = [members[i] for i in get_length_grouped_indices([self.lengths[i] for i in members],
                                                                      self.global_batch, generator=generator)]
            whole = len(grouped) - len(grouped) % self.global_batch
            batches += [grouped[i:i + self.global_batch] for i in range(0, whole, self.global_batch)]
            rest += grouped[whole:]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [i for b in shuffled for i in batches[b]] + rest


def training_loader(dataset: Dataset, collator: Callable, batch_size: int, seed: int, num_workers: int = 0,
                    group_by_length: bool = False) -> DataLoader:
    """Shuffled by ``EpochSampler`` (``LengthGroupedSampler`` with ``group_by_length``: the records' lengths and
    modalities come from ``xllm.datasets.lengths``), incomplete last batches dropped; a stream (webdataset
    shards) orders and batches itself, so that its order is the same whatever the number of workers and a resume
    re-enters it."""
    if isinstance(dataset, IterableDataset):
        if not hasattr(dataset, "set_position"):
            raise ValueError(f"{type(dataset).__name__}: streamed training data must come from one webdataset "
                             "dataset (several streams cannot be resumed exactly); configure one, or map-style data")
        if group_by_length:
            raise ValueError("run.group_by_length needs map-style training data: a webdataset stream keeps its "
                             "shards' order (use the dataset's map-style builder, or group_by_length: false)")
        dataset.batch_size = batch_size
        return DataLoader(dataset, batch_size=None, collate_fn=collator, num_workers=num_workers)
    if group_by_length:
        sampler = LengthGroupedSampler(record_lengths(dataset), record_modalities(dataset), seed,
                                       batch_size * dist.world_size())
    else:
        sampler = EpochSampler(len(dataset), seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      drop_last=True)


def evaluation_loader(dataset: Dataset, collator: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
