"""Builds the composite model from a resolved ``model`` config section."""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from torch import nn

from xllm.common.checkpoint import load_weights
from xllm.common.config import as_list
from xllm.common.registry import registry
from xllm.models.interfaces.qformer_text import is_text_branch_key
from xllm.models.pretrained import load_pretrained
from xllm.models.xllm import XLLM, Modality

log = logging.getLogger(__name__)

NO_LLM = "none"  # model.llm.backend of a model built without an LLM


def build_model(cfg: DictConfig) -> XLLM:
    """Every part from the registry by name; all parameters frozen until a trainable manifest opens some."""
    # Stage 1 trains an interface on its own objective: ``backend: none`` spares loading an LLM it never reads.
    llm = None if cfg.llm.backend == NO_LLM else registry.get("llm", cfg.llm.backend).from_config(cfg.llm)
    modalities = {}
    # A modality that ``shares`` another's modules is built after it and listed after it, so shared parameters
    # keep their owner's names (``interfaces.image.qformer.*``) in manifests and checkpoints.
    for name in sorted(cfg.modalities, key=lambda m: cfg.modalities[m].shares is not None):
        parts = cfg.modalities[name]
        shared = {}
        if parts.shares is not None:
            if parts.shares not in modalities or cfg.modalities[parts.shares].shares is not None:
                raise ValueError(f"model.modalities.{name}.shares names {parts.shares!r}, which is not a modality "
                                 f"that owns its modules; modalities: {', '.join(cfg.modalities)}")
            shared = {"shared": modalities[parts.shares]}
        encoder = registry.get("encoder", parts.encoder.name).build(parts.encoder, **shared)
        interface = registry.get("interface", parts.interface.name).build(parts.interface, input_dim=encoder.output_dim,
                                                                          **shared)
        adapter = nn.Identity() if llm is None else registry.get("adapter", parts.adapter.name).build(
            parts.adapter, input_dim=interface.output_dim, output_dim=llm.hidden_size)
        modalities[name] = Modality(encoder, interface, adapter)
    model = XLLM(llm, modalities)
    model.requires_grad_(False)
    model.eval()
    if cfg.pretrained:
        eps = cfg.modalities.image.encoder.get("ln_vision_eps") if "image" in cfg.modalities else None
        load_pretrained(model, list(cfg.pretrained), ln_vision_eps=eps)
    for path in as_list(cfg.checkpoint) if cfg.checkpoint else []:  # in order: later checkpoints win
        loaded = load_weights(model, path, optional=is_text_branch_key)  # stage 1's text branch: stage 2 has none
        log.info("loaded %d tensors from %s", len(loaded), path)
    return model
