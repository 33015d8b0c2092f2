"""What a feature cache's features depend on, on the model's side: each encoder's config and weights.

A cache written by one encoder must not feed a model whose encoder differs: ``check_feature_caches`` compares the
record of every cached modality (``xllm.processors.feature_cache``) with the model's own and refuses a cache
that differs, naming each setting with both values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from omegaconf import OmegaConf
from torch import nn

from xllm.processors.feature_cache import FeatureCacheError, differences, jsonable


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over a module's state dict, tensors in name order, each with its name, dtype and shape.

    Hashed by hand because no library digests a state dict without first copying it into one byte string
    (``safetensors.torch.save``), which would double the memory of a large encoder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encoder_record(model: nn.Module, modality: str) -> dict:
    """The modality's encoder as a cache records it: its config block (registered name included) and the
    digest of its weights."""
    config = OmegaConf.to_container(model.config.modalities[modality].encoder)
    return jsonable({"encoder": config, "weights_sha256": weights_digest(model.encoders[modality])})


def check_feature_caches(model: nn.Module, datasets: Iterable) -> None:
    """Every feature cache the datasets read from (their ``feature_cache``) against the model's encoders: a
    cached modality whose encoder config or weights differ is an error naming each difference."""
    records: dict[str, dict] = {}
    checked = set()
    for dataset in datasets:
        cache = getattr(dataset, "feature_cache", None)
        if cache is None or cache.root in checked:
            continue
        checked.add(cache.root)
        problems = []
        for modality, cached in cache.modalities.items():
            if modality not in model.encoders:
                continue  # the data holds no such media, or the collator refuses them by name
            if modality not in records:
                records[modality] = encoder_record(model, modality)
            own = records[modality]
            problems += differences({k: cached.get(k) for k in own}, own, f"model.modalities.{modality}")
        if problems:
            raise FeatureCacheError(f"feature cache {cache.root} was written by other encoders than the model's: "
                                    + "; ".join(problems) + " (write the cache again with this config)")
