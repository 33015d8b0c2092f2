"""Builds the composite model from a resolved ``model`` config section, ready for its stage.

Every part comes from the registries by name; original checkpoints and trained weights are loaded; then the
trainable manifest (``model.trainable``) decides what trains and everything else is frozen, so whoever gets
the model (the runner, a notebook) gets it as the stage wants it.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf
from torch import nn

from xllm.common.checkpoint import load_weights
from xllm.common.config import as_list
from xllm.common.dtypes import torch_dtype
from xllm.models.config import NO_LLM
from xllm.models.interfaces.qformer_text import is_text_branch_key
from xllm.models.lora import add_lora
from xllm.models.memory import enable_activation_checkpointing, store_frozen_in
from xllm.models.pretrained import load_pretrained
from xllm.models.registry import ADAPTERS, ENCODERS, INTERFACES, LLMS
from xllm.models.trainable import apply_trainable
from xllm.models.xllm import XLLM, Modality
from xllm.processors.registry import PROCESSORS

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig) -> XLLM:
    """The model of ``cfg`` (checked by ``xllm.models.config.resolve_model``), in eval mode; the parameters the
    manifest names train, the others are frozen."""
    # Stage 1 trains an interface on its own objective: ``backend: none`` spares loading an LLM it never reads.
    llm = None if cfg.llm.backend == NO_LLM else LLMS.get(cfg.llm.backend).from_config(cfg.llm)
    if llm is not None:
        llm.max_answer_length = cfg.llm.max_answer_length
        if cfg.llm.lora is not None:  # before any checkpoint: a run's checkpoint holds the adapters' weights
            log.info("LoRA beside %d layers of the LLM", len(add_lora(llm, cfg.llm.lora)))
    model = assemble(cfg, llm)
    model.config = cfg
    model.requires_grad_(False)
    if cfg.pretrained:
        eps = cfg.modalities.image.encoder.get("ln_vision_eps") if "image" in cfg.modalities else None
        load_pretrained(model, list(cfg.pretrained), ln_vision_eps=eps)
    for path in as_list(cfg.checkpoint) if cfg.checkpoint else []:  # in order: later checkpoints win
        loaded = load_weights(model, path, optional=is_text_branch_key)  # stage 1's text branch: stage 2 has none
        log.info("loaded %d tensors from %s", len(loaded), path)
    trainable = apply_trainable(model, list(cfg.trainable))
    if cfg.llm.lora is not None and not any(".lora_" in name for name in trainable):
        log.warning("model.llm.lora is set but model.trainable names none of its weights: they stay as loaded "
                    "(add 'llm.*lora_*' to train them)")
    if cfg.activation_checkpointing:
        log.info("activation checkpointing in %s", ", ".join(
            enable_activation_checkpointing(model, list(cfg.activation_checkpointing))))
    if cfg.frozen_dtype is not None:
        log.info("%d frozen parameters stored in %s", store_frozen_in(model, torch_dtype(cfg.frozen_dtype)),
                 cfg.frozen_dtype)
    return model.eval()


def assemble(cfg: DictConfig, llm: nn.Module | None) -> XLLM:
    """The composite of ``cfg``'s modalities around ``llm`` (anything with a ``hidden_size``), freshly built."""
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
        encoder = ENCODERS.get(parts.encoder.name).build(parts.encoder, **shared)
        interface = INTERFACES.get(parts.interface.name).build(parts.interface, input_dim=encoder.output_dim,
                                                               **shared)
        adapter = nn.Identity() if llm is None else ADAPTERS.get(parts.adapter.name).build(
            parts.adapter, input_dim=interface.output_dim, output_dim=llm.hidden_size)
        modalities[name] = Modality(encoder, interface, adapter)
    return XLLM(llm, modalities)


def build_processors(cfg: DictConfig) -> dict:
    """The processor each modality's config names (``model.modalities.<m>.processor``), by modality."""
    processors = {}
    for name, parts in cfg.modalities.items():
        if parts.processor:
            options = OmegaConf.to_container(parts.processor)
            processors[name] = PROCESSORS.get(options.pop("name"))(**options)
    return processors
