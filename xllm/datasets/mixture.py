"""A multi-task mixture: samples drawn from several datasets in configured ratios, each tagged with its task.

An epoch holds as many samples as the parts together; part ``i`` contributes ``ratio_i / sum(ratios)`` of
them, cycling through a seeded permutation of its own samples (so a small part repeats and a large one is
subsampled). The plan depends only on the seed, so a run and its resume see the same samples. The task name
(the dataset's name in the config) travels in each sample's ``task`` field for per-task losses.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.utils.data import ChainDataset, ConcatDataset, Dataset, IterableDataset

from xllm.datasets.lengths import record_lengths, record_modalities


class MixtureDataset(Dataset):
    def __init__(self, parts: dict[str, Dataset], ratios: dict[str, float], seed: int, size: int | None = None) -> None:
        if set(parts) != set(ratios):
            raise ValueError(f"mixture parts {sorted(parts)} and ratios {sorted(ratios)} name different datasets")
        empty = [name for name, part in parts.items() if len(part) == 0]
        if empty:
            raise ValueError(f"mixture dataset(s) {empty} hold no samples")
        self.parts = parts
        size = size if size is not None else sum(len(p) for p in parts.values())
        total = sum(ratios.values())
        counts = {name: round(size * ratios[name] / total) for name in parts}
        self.plan: list[tuple[str, int]] = []
        for offset, (name, part) in enumerate(parts.items()):
            generator = torch.Generator().manual_seed(seed * 1000 + offset)
            order = torch.randperm(len(part), generator=generator).tolist()
            self.plan += [(name, order[i % len(order)]) for i in range(counts[name])]
        self.counts = counts

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        name, inner = self.plan[index]
        return {**self.parts[name][inner], "task": name}

    def lengths(self) -> list[float]:
        """Each planned sample's length, its part's (``xllm.datasets.lengths``)."""
        return self._per_sample(record_lengths)

    def modalities(self) -> list[str]:
        return self._per_sample(record_modalities)

    def _per_sample(self, per_record) -> list:
        values = {name: per_record(part) for name, part in self.parts.items()}
        return [values[name][inner] for name, inner in self.plan]


def concat(datasets: list[Dataset]) -> Dataset:
    if len(datasets) == 1:
        return datasets[0]
    if any(isinstance(d, IterableDataset) for d in datasets):
        return ChainDataset(datasets)
    return ConcatDataset(datasets)


def training_set(parts: dict[str, Dataset], datasets_cfg: DictConfig, seed: int) -> Dataset:
    """The configured datasets' training splits as one set: a ratio mixture when the config gives
    ``datasets.<name>.ratio``, else their concatenation."""
    ratios = {name: datasets_cfg[name].get("ratio") for name in parts}
    if all(r is None for r in ratios.values()):
        return concat(list(parts.values()))
    unset = [name for name, r in ratios.items() if r is None]
    if unset:
        raise ValueError(f"datasets {unset} have no 'ratio' while others do: a mixture needs one per dataset")
    if any(isinstance(p, IterableDataset) for p in parts.values()):
        raise ValueError("a ratio mixture needs map-style (indexable) training sets, not streamed shards")
    return MixtureDataset(parts, ratios, seed)
