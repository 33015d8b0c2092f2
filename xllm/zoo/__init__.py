"""Pre-trained models of the tiny tier, built on this machine from the synthetic world."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from xllm.common.paths import ZOO_PREFIX


def zoo_references(cfg) -> set[str]:
    """Every ``zoo:<tier>/...`` path a config mentions."""
    node = OmegaConf.to_container(cfg) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    if isinstance(node, (dict, list)):
        return set().union(*map(zoo_references, node.values() if isinstance(node, dict) else node))
    return {node} if isinstance(node, str) and node.startswith(ZOO_PREFIX) else set()


def ensure(cfg) -> None:
    """Builds the zoo components a config refers to when they are missing (the first run of the main job)."""
    references = sorted(ref[len(ZOO_PREFIX):] for ref in zoo_references(cfg))
    tiers = {ref.split("/")[0] for ref in references}
    if tiers - {"tiny"}:
        raise ValueError(f"unknown zoo tier(s) {sorted(tiers - {'tiny'})}; the zoo builds: tiny")
    if not references:
        return
    from xllm.zoo import tiny

    names = sorted({ref.split("/")[1] for ref in references})
    todo = tiny.missing(names)
    if todo:
        print(f"building zoo:tiny components {', '.join(todo)} (once; cached in {tiny.zoo_dir()})")
        tiny.build(todo)
