"""The LLM loss read at labelled positions only equals the full-logits cross-entropy, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile
from transformers import Gemma2Config, Gemma2ForCausalLM

from xllm.models.config import LLMConfig
from xllm.models.llm import label_loss
from xllm.models.llm.chatglm_backend import ChatGLMBackend
from xllm.models.llm.hf_causal import HFCausalLM
from xllm.models.llm.label_loss import answer_loss, linear_cross_entropy
from xllm.processors.batch import IGNORE_INDEX


@pytest.fixture(autouse=True)
def threads(one_thread):
    yield


def left_padded(lengths: list[int], answers: list[int], vocab: int, pad: int, seed: int = 0):
    """Random rows of the given lengths left-padded to the longest, labels on each row's last ``answers`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (length, answer) in enumerate(zip(lengths, answers)):
        ids[row, width - length:] = torch.randint(0, vocab, (length,), generator=generator)
        mask[row, width - length:] = 1
        labels[row, width - answer:] = ids[row, width - answer:]
    return ids, mask, labels


def full_logits_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-row summed cross-entropy over every shifted position, ignoring unlabelled ones."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.sum() / (labels[:, 1:] != IGNORE_INDEX).sum(), losses.sum(dim=1)


def embeds_with_grad(llm, ids: torch.Tensor) -> torch.Tensor:
    return llm.embed(ids).detach().requires_grad_(True)


@pytest.fixture(scope="module")
def hf_llm(micro_zoo) -> HFCausalLM:
    llm = HFCausalLM.from_config(OmegaConf.structured(LLMConfig(path=str(micro_zoo["llm"]))))
    return llm.requires_grad_(False).eval()


def test_hf_loss_equals_the_models_own_labels_loss(hf_llm):
    assert hf_llm.plain_output_layer() is not None
    vocab = hf_llm.model.config.vocab_size
    ids, mask, labels = left_padded([9, 14, 6], [4, 7, 2], vocab, hf_llm.layout.pad_token_id)
    ours_embeds, theirs_embeds = embeds_with_grad(hf_llm, ids), embeds_with_grad(hf_llm, ids)
    out = hf_llm(ids, ours_embeds, mask, labels)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs = hf_llm.model(inputs_embeds=theirs_embeds, attention_mask=mask, position_ids=positions, labels=labels)
    assert out.logits is None
    assert torch.allclose(out.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    _, row_sums = full_logits_reference(theirs.logits.detach(), labels)
    assert torch.allclose(out.row_loss, row_sums, rtol=1e-5, atol=1e-5)
    assert out.row_units.tolist() == [4, 7, 2]
    out.loss.backward()
    theirs.loss.backward()
    assert torch.allclose(ours_embeds.grad, theirs_embeds.grad, rtol=1e-4, atol=1e-7)
    assert ours_embeds.grad.abs().sum() > 0


def test_hf_training_forward_attends_with_the_math_kernel_for_the_flash_kernels_values(hf_llm):
    """On CPU a forward that will be backpropagated takes the math kernel (its backward is the fast one there);
    its loss and gradients equal those of torch's flash kernel."""
    ids, mask, labels = left_padded([12, 5], [4, 2], hf_llm.model.config.vocab_size, hf_llm.layout.pad_token_id)
    ours_embeds, flash_embeds = embeds_with_grad(hf_llm, ids), embeds_with_grad(hf_llm, ids)
    with profile() as ours_profile:
        ours = hf_llm(ids, ours_embeds, mask, labels)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), profile() as flash_profile:
        flash = hf_llm.model(inputs_embeds=flash_embeds, attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0), labels=labels)
    kernels = [{event.key for event in run.key_averages()} for run in (ours_profile, flash_profile)]
    assert "aten::_scaled_dot_product_attention_math" in kernels[0]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels[1] - kernels[0]
    assert torch.allclose(ours.loss, flash.loss, rtol=1e-5, atol=1e-6)
    ours.loss.backward()
    flash.loss.backward()
    assert torch.allclose(ours_embeds.grad, flash_embeds.grad, rtol=1e-4, atol=1e-7)


def test_hf_loss_of_a_model_that_transforms_its_logits(hf_llm):
    """Gemma-2 softcaps its logits after lm_head: its loss goes through its own forward, still at labels only."""
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=3.0, pad_token_id=0)).eval()
    llm = HFCausalLM(gemma, hf_llm.tokenizer)
    assert llm.plain_output_layer() is None
    ids, mask, labels = left_padded([7, 11], [3, 5], 96, pad=0, seed=1)
    embeds = embeds_with_grad(llm, ids)
    out = llm(ids, embeds, mask, labels)
    theirs = gemma(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   labels=labels)
    assert torch.allclose(out.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.row_loss, full_logits_reference(theirs.logits.detach(), labels)[1], rtol=1e-5)


def test_hf_logits_without_labels_are_every_positions(hf_llm):
    ids, mask, _ = left_padded([5, 8], [1, 1], hf_llm.model.config.vocab_size, hf_llm.layout.pad_token_id)
    with torch.no_grad():
        out = hf_llm(ids, hf_llm.embed(ids), mask)
    assert out.logits.shape == (2, 8, hf_llm.model.config.vocab_size) and out.loss is None


@pytest.fixture(scope="module")
def chatglm(micro_chatglm) -> ChatGLMBackend:
    return ChatGLMBackend.from_pretrained(micro_chatglm).requires_grad_(False).eval()


def chatglm_rows(backend: ChatGLMBackend):
    """Three left-padded prompt + answer rows laid out as the backend lays them ([gMASK] <sop> answer <eop>)."""
    layout = backend.layout
    rows = [layout.build_sequence(layout.tokenize(layout.format_prompt(query)), answer) for query, answer in
            [("图里有什么？", "一个红色的圆形。"), ("Describe it.", "a big blue square on the left."), ("好", "好。")]]
    width = max(len(ids) for ids, _ in rows)
    pad = layout.pad_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row, _ in rows])
    labels = torch.tensor([[IGNORE_INDEX] * (width - len(row)) + row for _, row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row, _ in rows])
    return ids, mask, labels


def test_chatglm_loss_equals_the_full_logits_cross_entropy(chatglm):
    ids, mask, labels = chatglm_rows(chatglm)
    ours_embeds, theirs_embeds = embeds_with_grad(chatglm, ids), embeds_with_grad(chatglm, ids)
    out = chatglm(ids, ours_embeds, mask, labels)
    theirs = chatglm.model(input_ids=ids, inputs_embeds=theirs_embeds, attention_mask=mask, labels=labels,
                           use_cache=False)
    assert torch.allclose(out.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    mean, row_sums = full_logits_reference(theirs.logits.detach(), labels)
    assert torch.allclose(out.loss, mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.row_loss, row_sums, rtol=1e-5, atol=1e-5)
    assert out.row_units.tolist() == (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    out.loss.backward()
    theirs.loss.backward()
    assert torch.allclose(ours_embeds.grad, theirs_embeds.grad, rtol=1e-4, atol=1e-7)


def test_a_trained_output_layer_gets_the_full_logits_gradient(micro_chatglm):
    """The tiny ChatGLM's pre-training trains the tied output matrix through this loss."""
    ids, mask, labels = chatglm_rows(ChatGLMBackend.from_pretrained(micro_chatglm))
    grads = []
    for fused in (True, False):
        backend = ChatGLMBackend.from_pretrained(micro_chatglm)
        embeds = backend.embed(ids)
        if fused:
            loss = backend(ids, embeds, mask, labels).loss
        else:
            loss = backend.model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad for n, p in backend.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name


def test_linear_cross_entropy_gradients_in_chunks(monkeypatch):
    """Every gradient (hidden, weight, bias) checked numerically in fp64, over several chunks."""
    monkeypatch.setattr(label_loss, "LOGIT_CHUNK_ELEMENTS", 2 * 13)  # two rows of a 13-word vocabulary per chunk
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(13, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 12, 5, 5, 7])
    assert torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, b, targets)[0], (hidden, weight, bias))
    total, per_token = linear_cross_entropy(hidden, weight, bias, targets)
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="none")
    assert torch.allclose(per_token, reference) and torch.allclose(total, reference.sum())
    assert not per_token.requires_grad


def test_bf16_autocast_follows_the_ordinary_path():
    """Under autocast the output layer runs in bf16 and the softmax in fp32, as lm_head + cross_entropy do."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 6], [IGNORE_INDEX] * 4 + [7, 8]])
    ours_hidden, theirs_hidden = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = answer_loss(ours_hidden, labels, weight)
        mean, _ = full_logits_reference(F.linear(theirs_hidden, weight), labels)
    assert ours.loss.dtype == torch.float32
    assert torch.allclose(ours.loss, mean, rtol=1e-3)
    ours.loss.backward()
    mean.backward()
    assert torch.allclose(ours_hidden.grad, theirs_hidden.grad, rtol=2e-2, atol=1e-3)


def test_no_gradient_work_without_grad_mode():
    weight = torch.randn(20, 8, requires_grad=True)
    with torch.no_grad():
        total, _ = linear_cross_entropy(torch.randn(3, 8), weight, None, torch.tensor([1, 2, 3]))
    assert total.grad_fn is None
