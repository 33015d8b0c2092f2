"""Builds the composite model from a resolved ``model`` config section."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from xllm.common.checkpoint import load_weights
from xllm.common.registry import registry
from xllm.models.xllm import XLLM, Modality

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig) -> XLLM:
    """Every part from the registry by name; all parameters frozen until a trainable manifest opens some."""
    llm = registry.get("llm", cfg.llm.backend).from_config(cfg.llm)
    modalities = {}
    for name, parts in cfg.modalities.items():
        encoder = registry.get("encoder", parts.encoder.name).build(parts.encoder)
        interface = registry.get("interface", parts.interface.name).build(parts.interface, input_dim=encoder.output_dim)
        adapter = registry.get("adapter", parts.adapter.name).build(parts.adapter, input_dim=interface.output_dim,
                                                                    output_dim=llm.hidden_size)
        modalities[name] = Modality(encoder, interface, adapter)
    model = XLLM(llm, modalities)
    model.requires_grad_(False)
    model.eval()
    if cfg.checkpoint:
        loaded = load_weights(model, cfg.checkpoint)
        log.info("loaded %d tensors from %s", len(loaded), cfg.checkpoint)
    return model
