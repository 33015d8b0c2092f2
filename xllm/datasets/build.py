"""Datasets of a config's ``datasets`` section, by split."""

from __future__ import annotations

from omegaconf import DictConfig
from torch.utils.data import Dataset

from xllm.datasets.registry import BUILDERS


def build_split(datasets_cfg: DictConfig, split: str) -> dict[str, Dataset]:
    """``{name: dataset}`` for every configured dataset's ``split``."""
    if not datasets_cfg:
        raise ValueError("the config's 'datasets' section is empty")
    return {name: BUILDERS.get(entry.builder)(entry).build(split) for name, entry in datasets_cfg.items()}
