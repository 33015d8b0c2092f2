"""Pre-trained models of the tiny tier, built on this machine from the synthetic world."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from xllm.common.paths import ZOO_PREFIX


def zoo_references(cfg) -> set[str]:
    """Every ``zoo:<tier>/...`` path a config mentions."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, (dict, DictConfig)):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, ListConfig)):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node.startswith(ZOO_PREFIX):
            found.add(node)

    walk(OmegaConf.to_container(cfg) if isinstance(cfg, (DictConfig, ListConfig)) else cfg)
    return found


def ensure(cfg) -> None:
    """Builds the zoo models a config refers to when they are missing (the first run of the main job)."""
    tiers = {ref[len(ZOO_PREFIX):].split("/")[0] for ref in zoo_references(cfg)}
    unknown = tiers - {"tiny"}
    if unknown:
        raise ValueError(f"unknown zoo tier(s) {sorted(unknown)}; the zoo builds: tiny")
    if "tiny" in tiers:
        from xllm.zoo import tiny

        if not tiny.is_built():
            print("building the tiny tier's pre-trained LLM and image encoder (once; cached in "
                  f"{tiny.zoo_dir()})")
            tiny.build()
