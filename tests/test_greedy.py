"""xllm's own greedy loop against transformers' ``generate``: the same tokens, and every other request handed over."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from xllm.models.llm.greedy import few_rows_logits, greedy_decode, plain_greedy_settings


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def left_padded_prompts(model, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    embeds = torch.randn(len(lengths), width, model.config.hidden_size)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return embeds, mask


def transformers_tokens(model, embeds, mask, new_tokens: int, eos: int, pad: int, **kwargs) -> torch.Tensor:
    return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=eos,
                          pad_token_id=pad, do_sample=False, num_beams=1, **kwargs)


@pytest.mark.parametrize("through_head", [True, False], ids=["few-rows head", "model's own logits"])
def test_greedy_decoding_gives_transformers_tokens_with_rows_ending_early(llama, through_head):
    torch.manual_seed(1)
    embeds, mask = left_padded_prompts(llama, [7, 4, 9])
    pad = 0
    free = transformers_tokens(llama, embeds, mask, 12, eos=-1, pad=pad)
    eos = int(free[1, 3])  # an end token the second row reaches at its fourth step
    expected = transformers_tokens(llama, embeds, mask, 12, eos, pad)
    assert (expected[1, 4:] == pad).all() and not (expected == eos).all(-1).any()
    head = llama.get_output_embeddings() if through_head else None
    ours = greedy_decode(llama, head, embeds, mask, 12, eos, pad)
    assert torch.equal(ours, expected)


def test_min_new_tokens_hold_the_end_token_back_as_transformers_does(llama):
    torch.manual_seed(2)
    embeds, mask = left_padded_prompts(llama, [5, 8])
    eos = int(transformers_tokens(llama, embeds, mask, 6, eos=-1, pad=0)[0, 1])
    expected = transformers_tokens(llama, embeds, mask, 6, eos, 0, min_new_tokens=4)
    ours = greedy_decode(llama, llama.get_output_embeddings(), embeds, mask, 6, eos, 0, min_new_tokens=4)
    assert torch.equal(ours, expected) and not (ours[:, :4] == eos).any()


def test_every_step_is_put_to_a_streamer_then_its_end():
    class Recorder(BaseStreamer):
        def __init__(self):
            self.steps, self.ended = [], False

        def put(self, value):
            self.steps.append(value.tolist())

        def end(self):
            self.ended = True

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    embeds, mask = left_padded_prompts(model, [3])
    recorder = Recorder()
    ours = greedy_decode(model, None, embeds, mask, 5, eos_token_id=-1, pad_token_id=0, streamer=recorder)
    assert recorder.steps == [[token] for token in ours[0].tolist()] and recorder.ended


def test_the_few_rows_product_is_the_linear_layer():
    torch.manual_seed(4)
    head = torch.nn.Linear(48, 1000, bias=True)
    rows = torch.randn(8, 48)
    torch.testing.assert_close(few_rows_logits(rows, head), head(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("request_kwargs, plain", [
    ({"do_sample": False, "num_beams": 1, "min_new_tokens": 3, "temperature": 0.7}, True),
    ({"do_sample": False, "num_beams": 1, "streamer": object()}, True),
    ({"do_sample": True}, False),
    ({"num_beams": 3}, False),
    ({"repetition_penalty": 1.3}, False),
    ({"no_repeat_ngram_size": 2}, False),
    ({"suppress_tokens": [5]}, False),
    ({"logits_processor": []}, False),
])
def test_only_plain_greedy_requests_take_the_own_loop(llama, request_kwargs, plain):
    assert (plain_greedy_settings(llama, request_kwargs) is not None) == plain


def test_a_penalty_in_the_models_generation_config_sends_greedy_requests_to_transformers(llama):
    original = llama.generation_config.repetition_penalty
    llama.generation_config.repetition_penalty = 1.2
    try:
        assert plain_greedy_settings(llama, {"do_sample": False, "num_beams": 1}) is None
    finally:
        llama.generation_config.repetition_penalty = original
