"""Datasets of a config's ``datasets`` section, by split."""

from __future__ import annotations

from omegaconf import DictConfig
from torch.utils.data import Dataset, IterableDataset

from xllm.datasets.feature_cache import with_feature_cache
from xllm.datasets.guard import GuardedDataset
from xllm.datasets.registry import BUILDERS


def build_split(datasets_cfg: DictConfig, split: str) -> dict[str, Dataset]:
    """``{name: dataset}`` for every configured dataset's ``split``, its media read from the dataset's
    ``feature_cache`` when it names one (``xllm.datasets.feature_cache``); map-style ones guarded against
    unreadable samples (``xllm.datasets.guard``; streams skip theirs as they read)."""
    if not datasets_cfg:
        raise ValueError("the config's 'datasets' section is empty")
    built = {}
    for name, entry in datasets_cfg.items():
        dataset = BUILDERS.get(entry.builder)(entry).build(split)
        if entry.get("feature_cache"):
            dataset = with_feature_cache(dataset, name, entry.feature_cache, split)
        if not isinstance(dataset, IterableDataset):
            if len(dataset) == 0:
                raise ValueError(f"dataset {name!r} has no {split} samples")
            dataset = GuardedDataset(dataset, name, entry.get("on_bad_sample", "error"), training=split == "train")
        built[name] = dataset
    return built
