"""``model.compile``: the repeated layers of named modules run through ``torch.compile`` in training passes.

On CPU most of a stage-2 step outside the frozen LLM's matmuls is element-wise work (RMSNorm's casts, rotary
embeddings, SiLU, the attention's softmax) that eager mode runs op by op; inductor fuses it into a few kernels per
layer (a mini stage-2 step: 2.00 s -> 1.81 s). A layer is compiled rather than the whole model: the layers of a
stack share one compiled graph, so compiling takes the time of one layer (about a minute on two cores, cached on
disk by inductor afterwards) instead of growing with the depth. Shapes are dynamic, so other batch and sequence
lengths reuse the graph. Passes without gradients (validation, generation with its KV cache) run the layers
eagerly: they would each compile graphs of their own for a few calls.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from xllm.models.trainable import outermost_modules


def is_layer_stack(module: nn.Module) -> bool:
    """An ``nn.ModuleList`` whose entries are all of one class: a stack of layers."""
    return isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(layer) for layer in module}) == 1


def compile_for_training(layer: nn.Module) -> None:
    """Routes ``layer``'s calls through its class's compiled forward while gradients are enabled."""
    # The class's forward is compiled, not the layer's bound one, and the routing is a method bound to the layer:
    # a deep copy of the model rebinds it to the copy, whose own weights then run (a closure over this layer's
    # bound forward would keep running the original's).
    layer._compiled_forward = torch.compile(type(layer).forward, dynamic=True)
    layer.forward = types.MethodType(_training_forward, layer)


def _training_forward(self: nn.Module, *args, **kwargs):
    if torch.is_grad_enabled():
        return self._compiled_forward(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def compile_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """Compiles, for training passes, every layer of the stacks inside the modules ``patterns`` name (``llm``,
    ``interfaces.*``); returns the stacks' names. A pattern with no stack of layers under it is an error."""
    found = []
    for pattern in patterns:
        # Only the outermost stacks: a layer compiled whole holds any list inside it.
        stacks = outermost_modules(model, pattern, is_layer_stack)
        if not stacks:
            raise ValueError(f"model.compile: no stack of layers (an nn.ModuleList of one layer class) under "
                             f"{pattern!r}")
        for name, stack in stacks:  # a stack that an earlier pattern compiled is not wrapped twice
            if not any(name == done or name.startswith(done + ".") for done in found):
                for layer in stack:
                    compile_for_training(layer)
                found.append(name)
    return found
