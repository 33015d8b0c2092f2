"""The ``model`` section of a config: its schema, the defaults per model type, and its check.

Model defaults come from ``configs/models/{arch}/{model_type}.yaml`` and the run's ``model`` section overrides
them. Each component block (encoder, interface, adapter, processor) is checked against the ``Config`` of the
class registered under its name, so resolving a model section imports the model's components and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xllm.common.config import ConfigError, as_list, choice, component, load_yaml, path_field, registered, typed
from xllm.common.dtypes import DTYPES
from xllm.common.paths import configs_dir
from xllm.models.registry import ADAPTERS, ENCODERS, INTERFACES, LLMS
from xllm.processors.registry import PROCESSORS

NO_LLM = "none"  # model.llm.backend of a model built without an LLM (stage 1 never reads one)


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft's LoRA) beside the LLM's linear layers; they train when ``model.trainable`` names
    them (``llm.*lora_*``), the LLM's own weights stay frozen."""

    r: int = 8  # the rank of each update
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input, while they train
    # Module names, or the ends of dotted names, as peft matches them: q_proj, v_proj (Llama), query_key_value
    # (ChatGLM-6B)
    target_modules: list[str] = field(default_factory=list)


@dataclass
class LLMConfig:
    backend: str = "hf_causal"  # a registered LLM backend, or "none": no LLM
    path: str = path_field("model", default="")  # a folder, "zoo:<tier>/<name>", or a hub name when the hub is reachable
    dtype: str = choice(*DTYPES)
    gguf_file: str | None = None  # GGUF weights inside ``path`` (the mini tier's LLM ships that way)
    max_prompt_length: int | None = None  # prompt positions (text and media) a row may hold
    overflow: str = choice("refuse", "truncate")  # a longer prompt: an error, or its end kept (with a warning)
    max_answer_length: int | None = None  # answer tokens a training row keeps; longer answers are cut (a warning)
    lora: LoRAConfig | None = None  # LoRA on the LLM; None trains none of its weights
    # The system turn every prompt starts with (hf_causal with a chat template); None leaves the template's own
    # default, "" an empty turn (SmolLM2's default costs 16 positions in every row).
    system_prompt: str | None = None


@dataclass
class ModalityConfig:
    encoder: dict[str, Any] = field(default_factory=dict)  # {"name": <registered encoder>, ...its Config}
    interface: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=lambda: {"name": "linear"})
    processor: dict[str, Any] = field(default_factory=dict)  # what load_model_and_preprocess returns; {} for none
    shares: str | None = None  # another modality whose encoder and interface modules this one's build reuses


@dataclass
class ModelConfig:
    arch: str = "xllm"
    model_type: str = "tiny"
    llm: LLMConfig = field(default_factory=LLMConfig)
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)  # module names or globs; everything else is frozen
    # Modules whose layers recompute their activations in backward (``llm``, ``interfaces.*``): less memory.
    activation_checkpointing: list[str] = field(default_factory=list)
    # Modules whose layers run through torch.compile in training passes (``llm``): fused element-wise work.
    compile: list[str] = field(default_factory=list)
    frozen_dtype: str | None = choice(None, *DTYPES)  # the dtype frozen parts are stored in; None keeps theirs
    # Original checkpoints converted at build time, before ``checkpoint``: LAVIS/X-LLM ``.pth`` files, Hugging
    # Face ``Blip2*`` folders (``xllm.models.pretrained``); later ones win.
    pretrained: list[str] = path_field(default_factory=list)
    # Trained interfaces/adapters: a safetensors file or a run's checkpoint folder, or a list of them loaded in
    # order (later ones win), e.g. the stage-2 run of each modality. ``Any``: OmegaConf has no ``str | list``.
    checkpoint: Any = path_field(default=None)


def check_lora(lora: DictConfig, backend: str) -> None:
    where = "model.llm.lora"
    if backend == NO_LLM:
        raise ConfigError(f"config key '{where}' is set but model.llm.backend is 'none': there is no LLM to adapt")
    if lora.r < 1:
        raise ConfigError(f"config key '{where}.r' must be a positive rank, got {lora.r}")
    if lora.alpha <= 0:
        raise ConfigError(f"config key '{where}.alpha' must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"config key '{where}.dropout' must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules or not all(lora.target_modules):
        raise ConfigError(f"config key '{where}.target_modules' must name the LLM's modules to adapt (q_proj, "
                          f"v_proj, ...), got {list(lora.target_modules)}")


PARTS = {"encoder": ENCODERS, "interface": INTERFACES, "adapter": ADAPTERS}


def component_blocks(model: DictConfig) -> Iterator[tuple[type, DictConfig, str]]:
    """(the registered class's ``Config``, the block, its config key) of every modality's encoder, interface and
    adapter: where the path fields of a model's components are declared."""
    for name, modality in model.modalities.items():
        for part, registry in PARTS.items():
            block = modality[part]
            yield registry.get(block.name).Config, block, f"model.modalities.{name}.{part}"


def model_defaults(arch: str, model_type: str) -> DictConfig:
    path = configs_dir() / "models" / arch / f"{model_type}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (configs_dir() / "models" / arch).glob("*.yaml"))
        raise ConfigError(f"no model defaults for arch {arch!r}, model_type {model_type!r} ({path}); "
                          f"known model types: {', '.join(available) or '(none)'}")
    return load_yaml(path).get("model", OmegaConf.create())


def resolve_model(model: Any) -> DictConfig:
    """Defaults for the model's arch/model_type, overridden by ``model``, checked, components included."""
    model = OmegaConf.create(model or {})
    arch, model_type = model.get("arch", "xllm"), model.get("model_type", "tiny")
    merged = OmegaConf.merge(model_defaults(arch, model_type), model)
    checked = typed(ModelConfig, merged, "model")
    if checked.llm.backend != NO_LLM:
        registered(LLMS, checked.llm.backend, "model.llm.backend")
    if checked.llm.lora is not None:
        check_lora(checked.llm.lora, checked.llm.backend)
    if checked.checkpoint is not None and not all(isinstance(c, str) and c for c in as_list(checked.checkpoint)):
        raise ConfigError(f"config key 'model.checkpoint' must be a path or a list of paths, got {checked.checkpoint}")
    for name, modality in checked.modalities.items():
        where = f"model.modalities.{name}"
        for part, registry in PARTS.items():
            checked.modalities[name][part] = component(registry, modality[part], f"{where}.{part}")
        if modality.processor:
            checked.modalities[name].processor = component(PROCESSORS, modality.processor, f"{where}.processor")
    return checked
