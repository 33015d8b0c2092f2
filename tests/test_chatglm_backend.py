"""ChatGLM as an xllm LLM backend: prompt layout, labels, media slots, left padding, embeddings, generation."""

import json

import pytest
import torch

from xllm.models.registry import LLMS
from xllm.processors.batch import IGNORE_INDEX, MEDIA_SLOT
from xllm.models.llm.chatglm_backend import ChatGLMBackend

GMASK, SOP, EOP, PAD = 130001, 130004, 130005, 3


@pytest.fixture(scope="module")
def assets(shared_dir):
    return shared_dir / "assets" / "chatglm6b"


def tiny_config(assets) -> dict:
    config = json.loads((assets / "config.json").read_text())
    config.update(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128)
    return config


@pytest.fixture(scope="module")
def backend(assets):
    torch.manual_seed(0)
    return ChatGLMBackend.from_random(tiny_config(assets), assets).eval()


def left_pad_batch(backend, rows, media):
    """What the composite does: left-pad, note the slots, put the pad id there, scatter media embeddings."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([[PAD] * (width - len(ids)) + ids for ids, _ in rows])
    labels = torch.tensor([[IGNORE_INDEX] * (width - len(lab)) + lab for _, lab in rows])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
    slots = input_ids == MEDIA_SLOT
    input_ids[slots] = PAD
    embeds = backend.embed(input_ids)
    if media is not None:
        embeds = embeds.masked_scatter(slots[..., None], media)
    return input_ids, embeds, attention_mask, labels


@pytest.fixture(scope="module")
def media_prompts(backend):
    """Two prompts holding 3 and 4 media slots, their answers, and the media embeddings in slot order."""
    queries = [("这张图片里有什么？", "一只猫坐在桌子上。"), ("Describe it.", "A red square.")]
    prompts, answers, counts = [], [], []
    for i, (query, answer) in enumerate(queries):
        text = backend.layout.format_prompt(query)
        counts.append(3 + i)
        prompts.append(backend.layout.tokenize("<Image>") + [MEDIA_SLOT] * counts[-1] + backend.layout.tokenize("</Image>" + text))
        answers.append(answer)
    media = torch.randn(sum(counts), backend.hidden_size, generator=torch.Generator().manual_seed(1))
    return prompts, answers, media, counts


def test_registered():
    assert LLMS.get("chatglm") is ChatGLMBackend


def test_prompt_format(backend):
    assert backend.layout.format_prompt("图里有什么？") == "问：图里有什么？\n答："
    assert backend.layout.format_prompt("还有呢？", [("图里有什么？", "一只猫。")]) == (
        "[Round 0]\n问：图里有什么？\n答：一只猫。\n[Round 1]\n问：还有呢？\n答："
    )


def test_sequence_layout_and_labels(backend):
    prompt = backend.layout.tokenize("问：看") + [MEDIA_SLOT, MEDIA_SLOT] + backend.layout.tokenize("\n答：")
    answer = backend.layout.tokenize("一只猫。")
    ids, labels = backend.layout.build_sequence(prompt, "一只猫。")
    assert ids == prompt + [GMASK, SOP] + answer + [EOP]
    assert labels == [IGNORE_INDEX] * (len(prompt) + 2) + answer + [EOP]
    ids, labels = backend.layout.build_sequence(prompt, None)
    assert ids == prompt + [GMASK, SOP] and set(labels) == {IGNORE_INDEX}


def test_model_and_tokenizer_must_agree(backend, assets):
    config = {**tiny_config(assets), "gmask_token_id": 901, "vocab_size": 1000}
    with pytest.raises(ValueError, match="gmask_token_id: config 901, tokenizer 130001.*vocab_size"):
        ChatGLMBackend.from_random(config, assets)


def test_left_padded_rows_compute_what_they_compute_alone(backend, media_prompts):
    prompts, answers, media, counts = media_prompts
    rows = [backend.layout.build_sequence(prompt, answer) for prompt, answer in zip(prompts, answers)]
    input_ids, embeds, attention_mask, labels = left_pad_batch(backend, rows, media)
    with torch.no_grad():
        batch = backend(input_ids, embeds, attention_mask, labels)
        logits = backend(input_ids, embeds, attention_mask).logits
        offset, losses = 0, []
        for i, row in enumerate(rows):
            ids, row_embeds, row_mask, row_labels = left_pad_batch(backend, [row], media[offset:offset + counts[i]])
            offset += counts[i]
            alone = backend(ids, row_embeds, row_mask, row_labels)
            real = attention_mask[i].bool()
            assert (logits[i, real] - backend(ids, row_embeds, row_mask).logits[0]).abs().max() <= 1e-4
            assert torch.allclose(batch.row_loss[i], alone.row_loss[0], atol=1e-4)
            losses.append((alone.loss, (row_labels[0, 1:] != IGNORE_INDEX).sum()))
    total = sum(count for _, count in losses)
    assert torch.allclose(batch.loss, sum(loss * count for loss, count in losses) / total, atol=1e-5)


def test_inputs_embeds_equal_input_ids(backend):
    rows = [backend.layout.build_sequence(backend.layout.tokenize(backend.layout.format_prompt(q)), None) for q in ("你好", "早上好啊")]
    input_ids, embeds, attention_mask, _ = left_pad_batch(backend, rows, None)
    with torch.no_grad():
        via_embeds = backend(input_ids, embeds, attention_mask).logits
        via_ids = backend.model(input_ids, attention_mask=attention_mask).logits
    assert torch.equal(via_embeds, via_ids)


def test_left_padded_generation_equals_each_row_alone(backend, media_prompts):
    prompts, _, media, counts = media_prompts
    rows = [backend.layout.build_sequence(prompt, None) for prompt in prompts]
    input_ids, embeds, attention_mask, _ = left_pad_batch(backend, rows, media)
    generated = backend.generate(input_ids, embeds, attention_mask, max_new_tokens=6)
    offset = 0
    for i, row in enumerate(rows):
        ids, row_embeds, _, _ = left_pad_batch(backend, [row], media[offset:offset + counts[i]])
        offset += counts[i]
        alone = backend.model.generate(ids, 6, inputs_embeds=row_embeds, use_cache=False)[0, ids.shape[1]:].tolist()
        assert generated[i] == (alone[: alone.index(EOP)] if EOP in alone else alone)
        assert EOP not in generated[i] and len(generated[i]) <= 6
    assert any(generated)


def test_generation_stops_at_eop(assets):
    torch.manual_seed(0)
    backend = ChatGLMBackend.from_random(tiny_config(assets), assets).eval()
    with torch.no_grad():  # every position now predicts <eop>
        final = backend.model.transformer.final_layernorm
        final.weight.zero_()
        final.bias.copy_(backend.model.transformer.word_embeddings.weight[EOP] * 10)
    rows = [backend.layout.build_sequence(backend.layout.tokenize(backend.layout.format_prompt(q)), None) for q in ("你好", "再见吧")]
    input_ids, embeds, attention_mask, _ = left_pad_batch(backend, rows, None)
    assert backend.generate(input_ids, embeds, attention_mask, max_new_tokens=5) == [[], []]
    assert backend.decode(backend.layout.tokenize("好的") + [EOP] + backend.layout.tokenize("多余")) == "好的"


def test_frozen_model_passes_gradients_to_inputs_embeds(assets, media_prompts):
    prompts, answers, media, _ = media_prompts
    backend = ChatGLMBackend.from_random(tiny_config(assets), assets)
    rows = [backend.layout.build_sequence(prompt, answer) for prompt, answer in zip(prompts, answers)]
    for parameter in backend.parameters():
        parameter.requires_grad_(False)
    input_ids, _, attention_mask, labels = left_pad_batch(backend, rows, None)
    media = media.clone().requires_grad_(True)
    slots = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (ids, _) in enumerate(rows):
        slots[i, input_ids.shape[1] - len(ids):] = torch.tensor(ids) == MEDIA_SLOT
    embeds = backend.embed(input_ids).masked_scatter(slots[..., None], media)
    backend(input_ids, embeds, attention_mask, labels).loss.backward()
    assert media.grad is not None and media.grad.abs().sum() > 0
    assert not any(p.requires_grad or p.grad is not None for p in backend.parameters())
