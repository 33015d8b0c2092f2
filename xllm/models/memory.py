"""What a stage keeps in memory: the dtype frozen modules are stored in, and layers recomputed in backward.

Stage 2's memory is mostly the frozen LLM's activations, which the gradient flows back through to the media
embeddings: its weights never train, but its layers must still keep (or recompute) their activations.
Activation checkpointing recomputes them in backward. transformers' layers and the native ChatGLM checkpoint
only while their module is in training mode, which a frozen module never is (``set_train_mode``), so a
checkpointing module is put in training mode itself while its children keep theirs: no dropout turns on.
The recomputation attends with the attention kernels its forward could use (``same_attention_kernels``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel

from xllm.models.trainable import outermost_modules


def supports_checkpointing(module: nn.Module) -> bool:
    return callable(getattr(module, "activation_checkpointing_enable", None)) and getattr(
        module, "supports_gradient_checkpointing", True)


def same_attention_kernels() -> tuple[AbstractContextManager, AbstractContextManager]:
    """A ``torch.utils.checkpoint`` ``context_fn``: the recomputation in backward may use the kernels the forward
    could. Backward runs outside any ``sdpa_kernel`` block the forward ran in (the HF backend's training forward
    picks the math kernel on CPU), and a recomputation under another kernel gives other values, which torch's
    checkpoint refuses."""
    # torch has no public query of the enabled kernels; this is the one ``sdpa_kernel`` saves and restores with,
    # and it covers every backend (a device's overrideable one included).
    return nullcontext(), sdpa_kernel(_cur_sdpa_kernel_backends())


def enable_activation_checkpointing(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turns on activation checkpointing in every transformers model (and native ChatGLM) inside the modules
    ``patterns`` name (``llm``, ``interfaces.*``); returns the names of those models.

    A pattern under which no model can checkpoint is an error, as a trainable pattern that matches nothing is.
    """
    found = []
    for pattern in patterns:
        # The outermost models only: enabling one reaches the layers of every model inside it.
        outermost = outermost_modules(model, pattern, supports_checkpointing)
        if not outermost:
            raise ValueError(f"model.activation_checkpointing: no module under {pattern!r} can recompute its "
                             "layers (transformers models and the native ChatGLM can)")
        for name, module in outermost:
            module.activation_checkpointing_enable({"use_reentrant": False, "context_fn": same_attention_kernels})
            found.append(name)
    return found


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Casts every part of the composite (the LLM, each encoder, interface and adapter) whose parameters are all
    frozen to ``dtype``; returns the number of parameters cast. A part that trains keeps its dtype whole: the
    optimizer updates it in full precision, and its layers never mix dtypes. ``Modality`` casts each medium to
    the dtype of the part that reads it."""
    parts = [model.llm] if model.llm is not None else []
    for group in (model.encoders, model.interfaces, model.adapters):
        parts += list(group.values())
    cast: dict[int, int] = {}  # by parameter id: the video encoder shares the image encoder's
    for part in parts:
        params = list(part.parameters())
        if params and not any(p.requires_grad for p in params):
            part.to(dtype)
            cast.update((id(p), p.numel()) for p in part.parameters())
    return sum(cast.values())


def dtype_of(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter; None for a module without parameters."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
