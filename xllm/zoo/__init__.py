"""Pre-trained models built on this machine: the tiny tier (everything, from the synthetic world) and the mini
tier's image encoder (no pretrained one can be had offline)."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig, ListConfig, OmegaConf

from xllm.common.paths import ZOO_PREFIX

TIERS = ("tiny", "mini")  # each a module xllm.zoo.<tier> holding its TIER


def find_tier(name: str):
    """The ``Tier`` of ``zoo:<name>/...`` (imported on demand: building pulls in training code)."""
    if name not in TIERS:
        raise ValueError(f"unknown zoo tier {name!r}; the zoo builds: {', '.join(TIERS)}")
    return importlib.import_module(f"xllm.zoo.{name}").TIER


def zoo_references(cfg) -> set[str]:
    """Every ``zoo:<tier>/...`` path a config mentions."""
    node = OmegaConf.to_container(cfg) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    if isinstance(node, (dict, list)):
        return set().union(*map(zoo_references, node.values() if isinstance(node, dict) else node))
    return {node} if isinstance(node, str) and node.startswith(ZOO_PREFIX) else set()


def ensure(cfg) -> None:
    """Builds the zoo components a config refers to when they are missing (the first run of the main job)."""
    references = sorted(ref[len(ZOO_PREFIX):] for ref in zoo_references(cfg))
    for name in sorted({ref.split("/")[0] for ref in references}):
        zoo_tier = find_tier(name)
        todo = zoo_tier.missing(sorted({ref.split("/")[1] for ref in references if ref.split("/")[0] == name}))
        if todo:
            print(f"building zoo:{name} components {', '.join(todo)} (once; cached in {zoo_tier.folder()})")
            zoo_tier.build(todo)
