"""The trainable manifest: which modules train in a stage; everything else is frozen and in eval mode."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn


def matches(name: str, patterns: list[str]) -> bool:
    """A parameter named ``a.b.c`` matches ``a.b`` (its module), ``a.b.c`` or a glob such as ``adapters.*``."""
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def outermost_modules(model: nn.Module, pattern: str, keep: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """The named submodules under ``pattern`` for which ``keep`` holds, less those inside another of them."""
    inside = [(name, module) for name, module in model.named_modules()
              if name and matches(name, [pattern]) and keep(module)]
    return [(name, module) for name, module in inside if not any(name.startswith(o + ".") for o, _ in inside)]


def apply_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Sets requires_grad by the manifest and returns the names of the trainable parameters.

    A pattern that matches no parameter is an error: a typo would otherwise freeze what was meant to train.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(matches(name, [pattern]) for name in names):
            roots = sorted({".".join(n.split(".")[:2]) for n in names})
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter; modules: {', '.join(roots)}")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(matches(name, patterns))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def set_train_mode(model: nn.Module, training: bool) -> None:
    """Train mode for the modules that train; frozen ones stay in eval mode.

    A module trains when none of its parameters is frozen and it either holds a trainable parameter or sits in
    a training parent (dropout layers hold none). So the Q-Former's dropout runs while the frozen LLM's does not.
    A module that recomputes its activations in backward (``gradient_checkpointing`` on, ``xllm.models.memory``)
    checks its own mode for that, so it is in training mode while training, and its children keep theirs.
    """

    def visit(module: nn.Module, parent_training: bool) -> None:
        params = list(module.parameters())
        frozen = any(not p.requires_grad for p in params)
        trains = training and not frozen and (parent_training or any(p.requires_grad for p in params))
        module.training = trains or (training and getattr(module, "gradient_checkpointing", False) is True)
        for child in module.children():
            visit(child, trains)

    visit(model, False)
    # A LoRA layer (peft) holds frozen base weights beside its adapters, so by the rule above it stays in eval
    # mode and so would its parameter-free ``lora_dropout``: that dropout follows the adapters it feeds.
    for module in model.modules():
        dropout, adapters = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if isinstance(dropout, nn.Module) and isinstance(adapters, nn.Module):
            dropout.train(training and any(p.requires_grad for p in adapters.parameters()))
