"""Builds the composite model from a resolved ``model`` config section, ready for its stage.

Every part comes from the registries by name; original checkpoints and trained weights are loaded; then the
trainable manifest (``model.trainable``) decides what trains and everything else is frozen, so whoever gets
the model (the runner, a notebook) gets it as the stage wants it. ``build_run`` rebuilds what a run trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from xllm.common.checkpoint import latest_checkpoint, load_weights
from xllm.common.config import RUN_CONFIG, as_list, config_paths
from xllm.common.dtypes import torch_dtype
from xllm.models.config import NO_LLM, resolve_model
from xllm.models.interfaces.qformer_text import is_text_branch_key
from xllm.models.compiled import compile_layers
from xllm.models.lora import add_lora
from xllm.models.memory import enable_activation_checkpointing, store_frozen_in
from xllm.models.pretrained import load_pretrained
from xllm.models.registry import ADAPTERS, ENCODERS, INTERFACES, LLMS, register_arch
from xllm.models.trainable import apply_trainable
from xllm.models.xllm import XLLM, Modality
from xllm.processors.registry import PROCESSORS

log = logging.getLogger(__name__)


@register_arch("xllm")
def build_model(cfg: DictConfig) -> XLLM:
    """The model of ``cfg`` (checked by ``xllm.models.config.resolve_model``), in eval mode; the parameters the
    manifest names train, the others are frozen. ``model.source_keys`` names the weights the config's frozen
    sources gave it unchanged: what a shared model folder leaves out (``XLLM.save_pretrained``)."""
    # Stage 1 trains an interface on its own objective: ``backend: none`` spares loading an LLM it never reads.
    llm = None if cfg.llm.backend == NO_LLM else LLMS.get(cfg.llm.backend).from_config(cfg.llm)
    if llm is not None:
        llm.max_answer_length = cfg.llm.max_answer_length
        if cfg.llm.lora is not None:  # before any checkpoint: a run's checkpoint holds the adapters' weights
            log.info("LoRA beside %d layers of the LLM", len(add_lora(llm, cfg.llm.lora)))
    model = assemble(cfg, llm)
    model.config = cfg
    model.requires_grad_(False)
    sourced = source_keys(model, cfg)
    if cfg.pretrained:
        eps = cfg.modalities.image.encoder.get("ln_vision_eps") if "image" in cfg.modalities else None
        sourced |= set(load_pretrained(model, list(cfg.pretrained), ln_vision_eps=eps).filled)
    for path in as_list(cfg.checkpoint) if cfg.checkpoint else []:  # in order: later checkpoints win
        loaded = load_weights(model, path, optional=is_text_branch_key)  # stage 1's text branch: stage 2 has none
        log.info("loaded %d tensors from %s", len(loaded), path)
        sourced -= set(loaded)
    trainable = apply_trainable(model, list(cfg.trainable))
    model.source_keys = frozenset(sourced - set(trainable))
    if cfg.llm.lora is not None and not any(".lora_" in name for name in trainable):
        log.warning("model.llm.lora is set but model.trainable names none of its weights: they stay as loaded "
                    "(add 'llm.*lora_*' to train them)")
    if cfg.activation_checkpointing:
        log.info("activation checkpointing in %s", ", ".join(
            enable_activation_checkpointing(model, list(cfg.activation_checkpointing))))
    if cfg.frozen_dtype is not None:
        log.info("%d frozen parameters stored in %s", store_frozen_in(model, torch_dtype(cfg.frozen_dtype)),
                 cfg.frozen_dtype)
    if cfg.compile:
        log.info("layers compiled for training in %s", ", ".join(compile_layers(model, list(cfg.compile))))
    return model.eval()


def build_run(run: str | Path, checkpoint: str | Path | None = None) -> XLLM:
    """The model a run folder trained: its ``config.yaml`` with what the run started from (its
    ``model.checkpoint``), then its own weights, from ``checkpoint`` (a step folder or a safetensors file) or
    else its latest checkpoint."""
    run = Path(run).expanduser()
    config = run / RUN_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{run} is not a run folder: it has no {RUN_CONFIG} (train.py writes one)")
    if checkpoint is None and latest_checkpoint(run) is None:
        raise FileNotFoundError(f"run folder {run} holds no checkpoint yet")
    model_cfg = OmegaConf.load(config).model
    earlier = as_list(model_cfg.checkpoint) if model_cfg.checkpoint else []
    model_cfg.checkpoint = [*earlier, str(checkpoint or run)]
    return build_model(resolve_model(model_cfg))


def source_keys(model: XLLM, cfg: DictConfig) -> set[str]:
    """The weights that building ``cfg`` read from files: the LLM's own (not the LoRA adapters beside it) and
    those of each encoder whose config names its folder. Interfaces and adapters count as made here, even when a
    BERT folder started them: their weights are small and usually trained."""
    prefixes = ("llm.",) if model.llm is not None else ()
    prefixes += tuple(f"encoders.{name}." for name, parts in cfg.modalities.items()
                      if any(config_paths(ENCODERS.get(parts.encoder.name).Config, parts.encoder, "")))
    return {key for key in model.state_dict() if key.startswith(prefixes) and ".lora_" not in key}


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
