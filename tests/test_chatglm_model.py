"""Native ChatGLM-6B against outputs of the original code (shared/oracles/chatglm6b_tiny), plus loading,
saving, sizing, KV cache, generation and chat."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from xllm.models.llm.chatglm import (
    ChatGLMCheckpointError,
    ChatGLMConfig,
    ChatGLMForConditionalGeneration,
    ChatGLMTokenizer,
    build_prompt,
    choose_tokens,
    clean_response,
    invalid_score_processor,
    parameter_report,
    rotary_frequencies,
    sampling_warpers,
)

ATOL = 1e-3


@pytest.fixture(scope="module")
def oracle_dir(shared_dir):
    return shared_dir / "oracles" / "chatglm6b_tiny"


@pytest.fixture(scope="module")
def ref(oracle_dir):
    return load_file(oracle_dir / "reference_outputs.safetensors")


@pytest.fixture(scope="module")
def model(oracle_dir):
    return ChatGLMForConditionalGeneration.from_pretrained(oracle_dir).eval()


@pytest.fixture()
def sdpa_and_eager(model):
    yield ("sdpa", "eager")
    model.attn_implementation = "sdpa"


def assert_close(actual, expected, atol=ATOL):
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= atol, f"max |diff| {difference:.3g} > {atol}"


def case_c_inputs(ref):
    return {"attention_mask": ref["C.attention_mask"], "position_ids": ref["C.position_ids"]}


# --------------------------------------------------------------------------- oracle cases


def test_case_a_logits_hidden_states_attentions_and_cache(model, ref, sdpa_and_eager):
    for implementation in sdpa_and_eager:
        model.attn_implementation = implementation
        out = model(ref["A.input_ids"], use_cache=True, output_hidden_states=True, output_attentions=True)
        assert_close(out.logits, ref["A.logits"])
        for i, hidden in enumerate(out.hidden_states):
            assert_close(hidden, ref[f"A.hidden_states.{i}"])
        for i, (probs, (keys, values)) in enumerate(zip(out.attentions, out.past_key_values.to_legacy())):
            assert_close(probs, ref[f"A.attentions.{i}"], atol=1e-5)
            assert_close(keys, ref[f"A.past_key.{i}"], atol=1e-5)
            assert_close(values, ref[f"A.past_value.{i}"], atol=1e-5)


@pytest.mark.parametrize("case", ["A", "B"])
def test_model_built_mask_and_positions_equal_the_original(model, ref, case):
    blocked, positions = model.layout(ref[f"{case}.input_ids"])
    assert torch.equal(blocked, ref[f"{case}.attention_mask"])
    assert torch.equal(positions, ref[f"{case}.position_ids"])


def test_case_b_gmask_and_mask_only_rows(model, ref):
    assert_close(model(ref["B.input_ids"]).logits, ref["B.logits"])


def test_case_c_left_padded_batch(model, ref):
    ids = ref["C.input_ids"]
    assert_close(model(ids, **case_c_inputs(ref)).logits, ref["C.logits"])
    # A 0/1 padding mask makes the model build the same layout the original tokenizer produced.
    assert_close(model(ids, attention_mask=(ids != 3).long()).logits, ref["C.logits"])
    alone = model(ids[:1, 4:]).logits
    assert_close(model(ids, **case_c_inputs(ref)).logits[:1, 4:], alone, atol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "recompute"])
@pytest.mark.parametrize("case", ["genA", "genGB", "genC"])
def test_greedy_generation_equals_the_original(model, ref, case, use_cache):
    if case == "genC":
        input_ids, extra = ref["C.input_ids"], case_c_inputs(ref)
    else:
        input_ids, extra = ref[f"{case}.input_ids"], {}
    steps = list(model.iter_generate(input_ids, 10, use_cache=use_cache, **extra))
    generated = torch.stack([step.tokens for step in steps], dim=1)
    assert torch.equal(torch.cat((input_ids, generated), dim=1), ref[f"{case}.output_ids"])
    assert_close(torch.stack([step.logits for step in steps]), ref[f"{case}.step_logits"])


def test_padding_mask_generation_equals_the_original(model, ref):
    ids = ref["C.input_ids"]
    assert torch.equal(model.generate(ids, 10, attention_mask=(ids != 3).long()), ref["genC.output_ids"])


def test_rotary_frequencies_are_fp16_rounded():
    frequencies = rotary_frequencies(64)
    exact = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.equal(frequencies, exact.half().float())
    assert not torch.equal(frequencies.double(), exact)


# --------------------------------------------------------------------------- paths that must agree


def test_sdpa_equals_explicit_attention_with_fully_masked_rows(model, ref):
    ids = ref["C.input_ids"]  # four pad rows are fully masked
    model.attn_implementation = "eager"
    explicit = model(ids, **case_c_inputs(ref)).logits
    model.attn_implementation = "sdpa"
    assert_close(model(ids, **case_c_inputs(ref)).logits, explicit, atol=1e-4)


def test_cached_continuation_equals_full_forward(model, ref):
    ids = ref["B.input_ids"]  # both rows continue 4-5 tokens after <sop>
    full = model(ids).logits
    prefix = model(ids[:, :12], use_cache=True)
    rest = model(ids[:, 12:], past_key_values=prefix.past_key_values, use_cache=True)
    assert_close(torch.cat((prefix.logits, rest.logits), dim=1), full, atol=1e-4)
    one_by_one = prefix
    for j in range(12, ids.shape[1]):
        one_by_one = model(ids[:, j:j + 1], past_key_values=one_by_one.past_key_values, use_cache=True)
        assert_close(one_by_one.logits[:, 0], full[:, j], atol=1e-4)


def test_inputs_embeds_equal_input_ids(model, ref):
    ids = ref["C.input_ids"]
    embeds = model.get_input_embeddings()(ids)
    expected = model(ids, **case_c_inputs(ref)).logits
    assert torch.equal(model(ids, inputs_embeds=embeds, **case_c_inputs(ref)).logits, expected)
    assert torch.equal(model(inputs_embeds=embeds, **case_c_inputs(ref)).logits, expected)
    assert torch.equal(model(ids, inputs_embeds=embeds, attention_mask=(ids != 3).long()).logits, expected)
    with pytest.raises(ValueError, match="gMASK"):
        model(inputs_embeds=embeds)


def test_generation_from_inputs_embeds(model, ref):
    ids = ref["C.input_ids"]
    embeds = model.get_input_embeddings()(ids)
    for use_cache in (True, False):
        out = model.generate(ids, 10, inputs_embeds=embeds, use_cache=use_cache, **case_c_inputs(ref))
        assert torch.equal(out, ref["genC.output_ids"])


def test_loss_is_the_shifted_cross_entropy(model, ref):
    ids = ref["B.input_ids"]
    labels = ids.clone()
    labels[:, :11] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    assert torch.allclose(out.loss, expected)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(oracle_dir, ref):
    ids = ref["B.input_ids"]
    results = []
    for checkpointing in (False, True):
        model = ChatGLMForConditionalGeneration.from_pretrained(oracle_dir).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids, labels=ids)
        out.loss.backward()
        if checkpointing:
            assert out.past_key_values is None  # no cache while blocks are recomputed
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.allclose(loss, loss_ckpt)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-5), name


# --------------------------------------------------------------------------- generation controls


def test_generation_stops_at_eos_and_pads_finished_rows(model, ref):
    ids = ref["genGB.input_ids"]
    expected = ref["genGB.output_ids"][:, ids.shape[1]:]
    eos = int(expected[0, 1])  # row 0 emits it second; row 1 never does
    assert eos not in expected[1].tolist()
    out = model.generate(ids, 10, eos_token_id=eos)[:, ids.shape[1]:]
    assert torch.equal(out[0], torch.tensor(expected[0, :2].tolist() + [3] * 8))
    assert torch.equal(out[1], expected[1])
    single = model.generate(ids[:1], 10, eos_token_id=eos)
    assert single.shape[1] == ids.shape[1] + 2


def test_sampling_is_seeded_and_top_k_one_is_greedy(model, ref):
    ids = ref["genA.input_ids"]
    draws = [model.generate(ids, 8, do_sample=True, temperature=0.9, top_p=0.8, top_k=20,
                            generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    greedy = model.generate(ids, 8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, ref["genA.output_ids"][:, :ids.shape[1] + 8])


def test_top_k_and_top_p_filter_before_sampling():
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)  # softmax: 0.83, 0.11, 0.04, ...
    generator = torch.Generator().manual_seed(0)
    assert set(choose_tokens(logits, (), True, 1.0, 0, 0.8, generator).tolist()) == {0}
    assert set(choose_tokens(logits, (), True, 1.0, 0, 0.9, generator).tolist()) == {0, 1}
    assert set(choose_tokens(logits, (), True, 5.0, 3, 1.0, generator).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.95, 50, 0.7), (3.0, 20, 0.5), (0.5, 0, 0.9),
                                                        (1.0, 7, 1.0)])
def test_sampling_draws_from_transformers_warpers(temperature, top_k, top_p):
    """The distribution sampled from is the one transformers' warpers give, chained as its generate chains them
    (temperature -> top-k -> top-p: with temperature 3 and top-p 0.5, top-p first would keep other tokens)."""
    logits = torch.randn(500, 64, generator=torch.Generator().manual_seed(1)) * 3
    chain = [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None, TopPLogitsWarper(top_p)]
    warped = LogitsProcessorList([warper for warper in chain if warper is not None])(None, logits)
    assert torch.equal(sampling_warpers(temperature, top_k, top_p)(None, logits).softmax(-1), warped.softmax(-1))
    drawn = choose_tokens(logits, (), True, temperature, top_k, top_p, torch.Generator().manual_seed(2))
    expected = torch.multinomial(warped.softmax(-1), 1, generator=torch.Generator().manual_seed(2)).squeeze(-1)
    assert torch.equal(drawn, expected)


def test_invalid_score_processor():
    scores = torch.tensor([[0.0, 1.0, float("nan"), 2.0, 3.0, 4.0, 5.0]])
    fixed = invalid_score_processor(scores)
    assert fixed[0, 5] == 5e4 and fixed.sum() == 5e4
    finite = torch.randn(2, 7)
    assert torch.equal(invalid_score_processor(finite), finite)


# --------------------------------------------------------------------------- checkpoints


def test_dtypes(oracle_dir, ref):
    for dtype in (torch.bfloat16, torch.float16):
        model = ChatGLMForConditionalGeneration.from_pretrained(oracle_dir, torch_dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert torch.equal(model.generate(ref["genA.input_ids"], 10), ref["genA.output_ids"])
    half = ChatGLMForConditionalGeneration.from_pretrained(oracle_dir, torch_dtype="float16")
    assert_close(half(ref["A.input_ids"]).logits, ref["A.logits"], atol=0.25)


def copy_oracle(oracle_dir, folder, **changes):
    """The oracle checkpoint in ``folder`` with tensors replaced (None deletes)."""
    folder.mkdir()
    shutil.copy(oracle_dir / "config.json", folder / "config.json")
    tensors = load_file(oracle_dir / "model.safetensors")
    for key, value in changes.items():
        tensors.pop(key) if value is None else tensors.__setitem__(key, value)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_loading_errors_list_every_problem(oracle_dir, tmp_path):
    folder = copy_oracle(oracle_dir, tmp_path / "bad", **{
        "transformer.layers.1.mlp.dense_4h_to_h.bias": None,
        "transformer.layers.0.attention.dense.weight": torch.zeros(64, 32),
        "transformer.extra.weight": torch.zeros(3),
    })
    with pytest.raises(ChatGLMCheckpointError) as error:
        ChatGLMForConditionalGeneration.from_pretrained(folder)
    message = str(error.value)
    assert "3 problems" in message
    assert "missing key transformer.layers.1.mlp.dense_4h_to_h.bias" in message
    assert "unexpected key transformer.extra.weight in model.safetensors" in message
    assert "transformer.layers.0.attention.dense.weight in model.safetensors has shape [64, 32]" in message


def test_missing_shard_is_named(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=False, max_shard_size=200_000)
    shards = sorted(tmp_path.glob("pytorch_model-*.bin"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ChatGLMCheckpointError, match=f"missing shard file {shards[1].name}") as error:
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    assert "missing key transformer." in str(error.value)


@pytest.mark.parametrize("safe, shard", [(False, 200_000), (False, None), (True, 200_000)])
def test_save_and_load_round_trip(model, ref, tmp_path, safe, shard):
    model.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size=shard)
    if not safe and shard:
        index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
        assert index["weight_map"]["lm_head.weight"].startswith("pytorch_model-")
        assert "transformer.layers.0.attention.rotary_emb.inv_freq" in index["weight_map"]
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    assert torch.equal(loaded(ref["A.input_ids"]).logits, model(ref["A.input_ids"]).logits)
    assert ChatGLMConfig.from_json(tmp_path / "config.json") == model.config


def test_untied_lm_head_is_reported(oracle_dir, tmp_path, caplog):
    tensors = load_file(oracle_dir / "model.safetensors")
    folder = copy_oracle(oracle_dir, tmp_path / "untied", **{"lm_head.weight": tensors["lm_head.weight"] + 1})
    with caplog.at_level(logging.WARNING):
        ChatGLMForConditionalGeneration.from_pretrained(folder)
    assert "lm_head.weight differs" in caplog.text


def test_real_config_builds_on_meta_with_the_published_size(shared_dir):
    config = ChatGLMConfig.from_json(shared_dir / "assets" / "chatglm6b" / "config.json")
    assert (config.vocab_size, config.bos_token_id, config.gmask_token_id, config.pad_token_id) == (130528, 130004,
                                                                                                   130001, 3)
    model = ChatGLMForConditionalGeneration.from_config(config, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    report = parameter_report(model)
    assert report.parameters == 6_173_286_400
    assert report.checkpoint_parameters == 6_707_929_088
    assert report.parameters - report.embedding_parameters == 28 * 201_379_840 + 2 * 4096
    assert report.memory_bytes(torch.bfloat16) == report.memory_bytes(torch.float16) == 2 * 6_173_286_400


def test_config_needs_the_file_values(oracle_dir):
    data = json.loads((oracle_dir / "config.json").read_text())
    del data["gmask_token_id"]
    with pytest.raises(ValueError, match="gmask_token_id"):
        ChatGLMConfig.from_dict(data)
    with pytest.raises(NotImplementedError, match="pre_seq_len"):
        ChatGLMConfig.from_dict({**json.loads((oracle_dir / "config.json").read_text()), "pre_seq_len": 8})


# --------------------------------------------------------------------------- chat (real tokenizer, tiny model)


@pytest.fixture(scope="module")
def chat_setup(shared_dir):
    folder = shared_dir / "assets" / "chatglm6b"
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=32, num_layers=2, num_attention_heads=2, inner_hidden_size=64)
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration.from_config(config, device="cpu").eval()
    return model, ChatGLMTokenizer.from_pretrained(folder)


def test_chat_prompt_and_post_processing():
    assert build_prompt("你好") == "你好"
    assert build_prompt("再见", [("你好", "你好！")]) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答："
    assert clean_response("  好的,我知道了!ok, fine? [[训练时间]] ") == "好的，我知道了！ok, fine? 2023年"


def test_greedy_chat_decodes_the_generated_ids(chat_setup):
    model, tokenizer = chat_setup
    history = [("你好", "你好！")]
    response, new_history = model.chat(tokenizer, "今天天气怎么样？", history, max_length=60, do_sample=False)
    prompt = tokenizer.encode(build_prompt("今天天气怎么样？", history))
    new = model.generate(torch.tensor([prompt]), 60 - len(prompt), eos_token_id=130005)[0, len(prompt):].tolist()
    new = new[: new.index(130005)] if 130005 in new else new
    assert response == clean_response(tokenizer.decode(new))
    assert new_history == history + [("今天天气怎么样？", response)]


def test_stream_chat_yields_per_token_and_ends_like_chat(chat_setup):
    model, tokenizer = chat_setup
    streamed = list(model.stream_chat(tokenizer, "讲个故事", max_length=40, generator=torch.Generator().manual_seed(3)))
    response, history = model.chat(tokenizer, "讲个故事", max_length=40, generator=torch.Generator().manual_seed(3))
    prompt_length = len(tokenizer.encode("讲个故事"))
    assert 1 <= len(streamed) <= 40 - prompt_length
    assert streamed[-1] == (response, history)


def test_chat_prompt_overflow_is_never_silent(chat_setup, caplog):
    model, tokenizer = chat_setup
    query = "很长的问题" * 20
    length = len(tokenizer.encode(query))
    with pytest.raises(ValueError, match=f"{length} tokens.*max_length=20"):
        model.chat(tokenizer, query, max_length=20)
    with caplog.at_level(logging.WARNING):
        response, _ = model.chat(tokenizer, query, max_length=20, overflow="truncate", do_sample=False)
    assert f"chat prompt of {length} tokens truncated to its last 19" in caplog.text
    assert isinstance(response, str)
