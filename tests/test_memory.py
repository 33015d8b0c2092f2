"""Activation checkpointing of frozen and trainable layers in a stage, frozen parts stored in bf16, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from conftest import MICRO_QFORMER
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from xllm.common.config import ConfigError
from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.models.memory import same_attention_kernels

PROMPT = "<Image><ImageHere></Image> Describe the image."


@pytest.fixture(params=["hf_causal", "chatglm"])
def stage2_cfg(request, micro_model_cfg, micro_chatglm) -> dict:
    if request.param == "hf_causal":
        return micro_model_cfg
    return {**micro_model_cfg, "model_type": "tiny_zh", "llm": {"backend": "chatglm", "path": str(micro_chatglm)}}


def build(cfg: dict, **extra):
    torch.manual_seed(0)
    return build_model(resolve_model(OmegaConf.create({**cfg, **extra})))


def batch_of(model, n: int = 2):
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    samples = [{"id": str(i), "image": images[i], "prompt": PROMPT, "answer": "a red circle on the left"}
               for i in range(n)]
    return model.collator()(samples)


def layers_of(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer for lst in module.modules() if isinstance(lst, torch.nn.ModuleList) for layer in lst]


def step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward; the loss and the trainable parameters' gradients."""
    model.train()
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def count_layer_runs(model, parts: list[torch.nn.Module]) -> list[int]:
    """Hooks on the first child of each layer: a recomputed layer runs its children again in backward."""
    counts = []
    for part in parts:
        for layer in layers_of(part):
            child = next(layer.children())
            index = len(counts)
            counts.append(0)
            child.register_forward_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_checkpointing_recomputes_the_frozen_llm_and_the_interface_with_the_same_gradients(stage2_cfg):
    plain = build(stage2_cfg)
    batch = batch_of(plain)
    checkpointed = build(stage2_cfg, activation_checkpointing=["llm", "interfaces.image"])
    plain_runs = count_layer_runs(plain, [plain.llm, plain.interfaces.image])
    runs = count_layer_runs(checkpointed, [checkpointed.llm, checkpointed.interfaces.image])
    loss, grads = step(plain, batch)
    loss_ckpt, grads_ckpt = step(checkpointed, batch)
    assert plain_runs == [1] * len(plain_runs) and len(plain_runs) >= 4
    assert runs == [2] * len(runs)  # the frozen LLM's layers too, although the LLM stays in eval mode
    assert not checkpointed.llm.training or all(not m.training for m in checkpointed.llm.modules()
                                                if isinstance(m, torch.nn.Dropout))
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7)
    # Evaluation recomputes nothing: no gradient, no backward.
    runs[:] = [0] * len(runs)
    with torch.no_grad():
        checkpointed.eval()
        checkpointed(batch)
    assert runs == [1] * len(runs)


def test_the_recomputation_may_use_exactly_the_kernels_of_its_forward():
    """Made inside an ``sdpa_kernel`` block, the recomputation's context enables that block's kernels, and only
    them, wherever backward enters it."""
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION]):
        _, recompute = same_attention_kernels()
    assert torch.backends.cuda.flash_sdp_enabled()
    with recompute:
        enabled = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                   torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()]
    assert enabled == [False, True, True, False]
    assert torch.backends.cuda.flash_sdp_enabled()


def test_checkpointing_a_module_that_cannot_is_an_error(micro_model_cfg):
    with pytest.raises(ValueError, match="no module under 'adapters.image' can recompute its layers"):
        build(micro_model_cfg, activation_checkpointing=["adapters.image"])


def test_frozen_parts_stored_in_bf16_train_in_fp32(micro_model_cfg):
    reference = build(micro_model_cfg)
    batch = batch_of(reference)
    model = build(micro_model_cfg, frozen_dtype="bfloat16")
    dtypes = {name.split(".")[0]: p.dtype for name, p in model.named_parameters()}
    assert dtypes["llm"] == dtypes["encoders"] == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    loss, grads = step(model, batch)
    reference_loss, reference_grads = step(reference, batch)
    assert torch.isfinite(loss) and abs(float(loss) - float(reference_loss)) <= 2e-2 * float(reference_loss)
    flat = torch.cat([g.flatten() for _, g in sorted(grads.items())])
    reference_flat = torch.cat([g.flatten() for _, g in sorted(reference_grads.items())])
    assert float(torch.nn.functional.cosine_similarity(flat, reference_flat, dim=0)) >= 0.99
    with pytest.raises(ConfigError, match="model.frozen_dtype' must be one of"):
        resolve_model({**micro_model_cfg, "frozen_dtype": "bf16"})


def test_a_frozen_interface_in_bf16_feeds_a_trained_adapter_as_stage_3_does(micro_model_cfg):
    cfg = {**micro_model_cfg, "trainable": ["adapters.image"]}
    model = build(cfg, frozen_dtype="bfloat16")
    assert next(model.interfaces.parameters()).dtype == torch.bfloat16
    loss, grads = step(model, batch_of(model))
    reference_loss, _ = step(build(cfg), batch_of(model))
    assert set(grads) and all(name.startswith("adapters.image") for name in grads)
    assert abs(float(loss) - float(reference_loss)) <= 2e-2 * float(reference_loss)


def test_bf16_autocast_trains_close_to_fp32(micro_model_cfg):
    model = build(micro_model_cfg)
    batch = batch_of(model)
    reference, reference_grads = step(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = step(model, batch)
    assert abs(float(loss) - float(reference)) <= 2e-2 * float(reference)
    flat = torch.cat([g.flatten() for _, g in sorted(grads.items())])
    reference_flat = torch.cat([g.flatten() for _, g in sorted(reference_grads.items())])
    assert float(torch.nn.functional.cosine_similarity(flat, reference_flat, dim=0)) >= 0.99
    assert {g.dtype for g in grads.values()} == {torch.float32}
