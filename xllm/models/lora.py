"""LoRA on the frozen LLM (``model.llm.lora``): peft's low-rank adapters beside chosen linear layers.

The adapters are injected into the backend's transformer in place (``peft.inject_adapter_in_model``), so the
composite keeps its own names: a wrapped layer's weight becomes ``….q_proj.base_layer.weight`` and its adapters
``….q_proj.lora_A.default.weight`` / ``lora_B``, which the trainable manifest names with ``llm.*lora_*``, and which
a run's checkpoint saves beside the interfaces. ``merge_lora`` adds the updates into the base weights for
inference and puts the plain layers back, so the merged LLM has its original names and no adapter overhead.
"""

from __future__ import annotations

import difflib

from omegaconf import DictConfig
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from xllm.models.llm.base import LLMBackend

WHERE = "model.llm.lora.target_modules"


def targeted(name: str, target: str) -> bool:
    """Whether ``target`` names the module ``name``: the whole name or its end after a dot, peft's rule."""
    return name == target or name.endswith("." + target)


def add_lora(llm: LLMBackend, cfg: DictConfig) -> list[str]:
    """Injects LoRA layers of ``cfg`` (``xllm.models.config.LoRAConfig``) into ``llm.model``; returns the names of
    the wrapped modules. A target that names no module is an error listing the LLM's linear layers."""
    model = llm.model
    names = [name for name, _ in model.named_modules()]
    linear = sorted({name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)})
    for target in cfg.target_modules:
        if not any(targeted(name, target) for name in names):
            close = difflib.get_close_matches(target, linear, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{WHERE}: {target!r} names no module of the LLM ({type(model).__name__}); its linear "
                             f"layers are {', '.join(linear)}{hint}")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules))
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:  # a module LoRA cannot wrap (a norm, a whole block), in peft's words
        raise ValueError(f"{WHERE} {list(cfg.target_modules)}: {error}") from None
    return lora_layers(model)


def lora_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def merge_lora(model: nn.Module) -> int:
    """Adds each LoRA layer's update into its base layer's weight and puts the base layer back in its place:
    the same function, without the adapters. Returns the number of layers merged."""
    # peft unloads only through its model wrappers (``LoraModel.merge_and_unload``), which injected layers lack:
    # the same two steps, layer by layer (peft's ``merge`` does the arithmetic).
    layers = lora_layers(model)
    for name in layers:
        layer = model.get_submodule(name)
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return len(layers)
