import pytest
import torch
from omegaconf import OmegaConf

from xllm.common.config import resolve_model
from xllm.models import load_model, load_model_and_preprocess
from xllm.models.builder import build_model
from xllm.models.llm.base import IGNORE_INDEX, MEDIA_SLOT

SPAN = "<Image><ImageHere></Image>"


@pytest.fixture(scope="module")
def model(micro_model_cfg):
    torch.manual_seed(0)
    return build_model(resolve_model(OmegaConf.create(micro_model_cfg)))


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def test_media_fill_their_marker_positions(model):
    samples = {"image": images(2), "prompt": [f"{SPAN} Describe.", f"Look: {SPAN} and {SPAN}?"][:1] * 2,
               "answer": ["a red circle.", "b."]}
    media = model.encode_media(samples)
    batch = model.assemble(samples, media, with_answers=True)
    embeds = model.embed(batch, media)
    queries = model.interfaces["image"].query_tokens.shape[1]
    assert batch.slots.sum().item() == 2 * queries
    for row in range(2):
        assert torch.equal(embeds[row][batch.slots[row]], media["image"][row])
    # text positions keep the LLM's own embeddings
    text = ~batch.slots
    assert torch.equal(embeds[text], model.llm.embed(batch.input_ids)[text])


def test_labels_cover_only_the_answer_and_its_end(model):
    samples = {"image": images(1), "prompt": [f"{SPAN} Describe."], "answer": ["a red circle."]}
    media = model.encode_media(samples)
    batch = model.assemble(samples, media, with_answers=True)
    labels = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    tokenizer = model.llm.tokenizer
    assert labels == tokenizer("a red circle.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_two_images_in_a_multi_turn_prompt_follow_marker_order(model):
    history = [[(f"First {SPAN}", "one.")], [("Hi", "hello.")]]
    samples = {"image": images(3), "prompt": [f"Second {SPAN}", f"{SPAN} Describe."], "history": history,
               "answer": ["two.", "x."]}
    media = model.encode_media(samples)
    batch = model.assemble(samples, media, with_answers=True)
    assert batch.order == [("image", 0), ("image", 1), ("image", 2)]
    embeds = model.embed(batch, media)
    q = media["image"][0].shape[0]
    first_row = embeds[0][batch.slots[0]]
    assert torch.equal(first_row[:q], media["image"][0]) and torch.equal(first_row[q:], media["image"][1])


def test_marker_and_media_counts_must_agree(model):
    with pytest.raises(ValueError, match="2 image inputs given but the prompts hold 1"):
        model({"image": images(2), "prompt": [f"{SPAN} Describe."], "answer": ["x"]})
    with pytest.raises(ValueError, match="more <ImageHere> markers than the 1 image inputs"):
        model({"image": images(1), "prompt": [f"{SPAN}{SPAN}"], "answer": ["x"]})


def test_left_padded_row_equals_the_row_alone(model):
    prompts = [f"{SPAN} Describe.", f"Some longer text before {SPAN} and after it, to force padding."]
    pixels = images(2)
    both = model({"image": pixels, "prompt": prompts, "answer": ["a.", "b c d."]})
    alone = model({"image": pixels[1:], "prompt": prompts[1:], "answer": ["b c d."]})
    width = alone.logits.shape[1]
    assert torch.allclose(both.logits[1, -width:], alone.logits[0], atol=1e-5)
    generated = model.generate({"image": pixels, "prompt": prompts}, max_new_tokens=4)
    assert generated[1] == model.generate({"image": pixels[1:], "prompt": prompts[1:]}, max_new_tokens=4)[0]


def test_prompt_overflow_is_refused_or_truncated(micro_model_cfg):
    cfg = OmegaConf.merge(micro_model_cfg, {"llm": {"max_prompt_length": 12}})
    model = build_model(resolve_model(cfg))
    with pytest.raises(ValueError, match="exceeds llm.max_prompt_length=12"):
        model({"image": images(1), "prompt": [f"{SPAN} " + "word " * 20], "answer": ["x"]})
    model.llm.overflow = "truncate"
    assert model.llm.build_sequence([5] * 20, None)[0] == [5] * 12
    with pytest.raises(ValueError, match="cut a media span"):
        model.llm.build_sequence([MEDIA_SLOT] * 4 + [5] * 10, None)


def test_notebook_api_loads_trained_weights(micro_model_cfg, tmp_path):
    from safetensors.torch import save_file

    overrides = {k: v for k, v in micro_model_cfg.items() if k not in ("arch", "model_type")}
    model, vis, txt = load_model_and_preprocess("xllm", "tiny", is_eval=True, device="cpu", **overrides)
    assert not model.training and vis["eval"].image_size == 32 and txt["eval"]("  a   b ") == "a b"
    trained = {"adapters.image.weight": torch.full_like(model.adapters["image"].weight, 0.5)}
    save_file(trained, str(tmp_path / "w.safetensors"))
    reloaded = load_model("xllm", "tiny", checkpoint=tmp_path / "w.safetensors", **overrides)
    assert torch.equal(reloaded.adapters["image"].weight, trained["adapters.image.weight"])
    save_file({"adapters.image.wieght": trained["adapters.image.weight"]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys \\['adapters.image.wieght'\\]"):
        load_model("xllm", "tiny", checkpoint=tmp_path / "bad.safetensors", **overrides)
