"""``model.compile``: the LLM's layers compiled for training passes give the eager loss and gradients."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch._dynamo.utils import counters
from test_memory import batch_of, build, count_layer_runs, step


def test_compiled_layers_train_as_the_eager_ones_and_evaluate_eagerly(micro_model_cfg):
    eager = build(micro_model_cfg)
    batch = batch_of(eager, n=3)
    compiled = build(micro_model_cfg, compile=["llm"])
    torch._dynamo.reset()
    counters.clear()
    loss, grads = step(eager, batch)
    loss_compiled, grads_compiled = step(compiled, batch)
    assert counters["stats"]["unique_graphs"] == 1  # the layers went through the compiler, all in one graph
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=1e-6)
    assert grads_compiled.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-6)
    # Without gradients the layers run eagerly: bit-equal outputs, and no graph compiled for the pass.
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        eager.eval(), compiled.eval()
        assert torch.equal(compiled(batch).loss, eager(batch).loss)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_layers_recompute_in_backward_with_the_eager_gradients(micro_model_cfg):
    eager = build(micro_model_cfg)
    batch = batch_of(eager, n=2)
    both = build(micro_model_cfg, compile=["llm"], activation_checkpointing=["llm"])
    counts = count_layer_runs(both, [both.llm])
    loss, grads = step(eager, batch)
    loss_both, grads_both = step(both, batch)
    assert counts and all(count == 2 for count in counts)  # each layer ran again in backward
    torch.testing.assert_close(loss_both, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_both[name], grad, rtol=1e-4, atol=1e-6)


def test_a_deep_copy_of_a_compiled_model_trains_its_own_weights(micro_model_cfg):
    original = build(micro_model_cfg, compile=["llm"])
    batch = batch_of(original, n=2)
    copy = deepcopy(original)
    loss, grads = step(original, batch)
    original.llm.requires_grad_(True)  # so that gradients show whose LLM weights the copy's pass went through
    copy.llm.requires_grad_(True)
    copy.train()
    copy(batch).loss.backward()
    assert all(p.grad is None for p in original.llm.parameters())
    assert all(p.grad is not None for p in copy.llm.parameters() if p.dim() > 1)
    copy.zero_grad(set_to_none=True)
    copy.llm.requires_grad_(False)
    loss_copy, grads_copy = step(copy, batch)
    torch.testing.assert_close(loss_copy, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_copy[name], grad)


def test_compiling_a_module_without_layers_is_an_error(micro_model_cfg):
    with pytest.raises(ValueError, match="model.compile: no stack of layers .* under 'adapters.image'"):
        build(micro_model_cfg, compile=["adapters.image"])
