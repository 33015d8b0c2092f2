"""The ``datasets`` section of a config: one block per dataset, checked against its builder's ``Config``.

Besides its builder's options every dataset has ``ratio`` (its share of a mixture's samples, stage 3),
``metric`` (what its evaluation is scored by; the builder's ``metric`` when not given) and ``feature_cache`` (a
folder written by ``scripts/cache_features.py``: the samples then carry the frozen encoders' outputs).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from xllm.common.config import ConfigError, component
from xllm.datasets.registry import BUILDERS

SHARED_KEYS = ("ratio", "metric", "feature_cache")


def resolve_datasets(datasets: Any) -> DictConfig:
    checked = {}
    for name, entry in (datasets or {}).items():
        if not isinstance(entry, (dict, DictConfig)) or "builder" not in entry:
            raise ConfigError(f"config key 'datasets.{name}' needs a 'builder' naming a registered dataset builder")
        renamed = {("name" if k == "builder" else k): v for k, v in entry.items() if k not in SHARED_KEYS}
        block = component(BUILDERS, renamed, f"datasets.{name}")
        checked[name] = {("builder" if k == "name" else k): v for k, v in OmegaConf.to_container(block).items()}
        if "ratio" in entry:
            ratio = entry["ratio"]
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
                raise ConfigError(f"config key 'datasets.{name}.ratio' must be a positive number, got {ratio!r}")
            checked[name]["ratio"] = float(ratio)
        metric = entry.get("metric", BUILDERS.get(entry["builder"]).metric)
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"config key 'datasets.{name}.metric' must name a metric, got {metric!r}")
        checked[name]["metric"] = metric
        cache = entry.get("feature_cache")
        if cache is not None and (not isinstance(cache, str) or not cache):
            raise ConfigError(f"config key 'datasets.{name}.feature_cache' must be a folder, got {cache!r}")
        checked[name]["feature_cache"] = cache
    return OmegaConf.create(checked)
