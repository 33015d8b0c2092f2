import pickle

import pytest
import torch
from omegaconf import OmegaConf

from xllm.models.config import resolve_model
from xllm.models import load_model, load_model_and_preprocess
from xllm.models.builder import build_model
from xllm.processors.batch import IGNORE_INDEX

SPAN = "<Image><ImageHere></Image>"


@pytest.fixture(scope="module")
def model(micro_model_cfg):
    torch.manual_seed(0)
    return build_model(resolve_model(OmegaConf.create(micro_model_cfg)))


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def spliced(model, samples: dict):
    batch = model.make_batch(samples, with_answers="answer" in samples)
    media, _ = model.encode(batch)
    return batch, media, model.splice(batch, media)


def test_media_fill_their_marker_positions(model):
    samples = {"image": images(2), "prompt": [f"{SPAN} Describe.", f"Look: {SPAN} and {SPAN}?"][:1] * 2,
               "answer": ["a red circle.", "b."]}
    _, media, inputs = spliced(model, samples)
    queries = model.interfaces["image"].query_tokens.shape[1]
    slots = inputs.media_positions
    assert slots.sum().item() == 2 * queries
    for row in range(2):
        assert torch.equal(inputs.inputs_embeds[row][slots[row]], media["image"][row])
    # text positions keep the LLM's own embeddings
    text = ~slots
    assert torch.equal(inputs.inputs_embeds[text], model.llm.embed(inputs.input_ids)[text])


def test_labels_cover_only_the_answer_and_its_end(model):
    samples = {"image": images(1), "prompt": [f"{SPAN} Describe."], "answer": ["a red circle."]}
    _, _, inputs = spliced(model, samples)
    labels = inputs.labels[0][inputs.labels[0] != IGNORE_INDEX].tolist()
    tokenizer = model.llm.tokenizer
    assert labels == tokenizer("a red circle.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_two_images_in_a_multi_turn_prompt_follow_marker_order(model):
    history = [[(f"First {SPAN}", "one.")], [("Hi", "hello.")]]
    samples = {"image": images(3), "prompt": [f"Second {SPAN}", f"{SPAN} Describe."], "history": history,
               "answer": ["two.", "x."]}
    batch, media, inputs = spliced(model, samples)
    assert batch.placeholder_modalities() == ["image", "image", "image"]
    q = media["image"][0].shape[0]
    first_row = inputs.inputs_embeds[0][inputs.media_positions[0]]
    assert torch.equal(first_row[:q], media["image"][0]) and torch.equal(first_row[q:], media["image"][1])
    assert torch.equal(inputs.inputs_embeds[1][inputs.media_positions[1]], media["image"][2])


def test_marker_and_media_counts_must_agree(model):
    with pytest.raises(ValueError, match="the prompts hold 1 <ImageHere> markers but 2 image inputs were given"):
        model.make_batch({"image": images(2), "prompt": [f"{SPAN} Describe."], "answer": ["x"]}, with_answers=True)
    with pytest.raises(ValueError, match="the prompts hold 2 <ImageHere> markers but 1 image inputs were given"):
        model.make_batch({"image": images(1), "prompt": [f"{SPAN}{SPAN}"], "answer": ["x"]}, with_answers=True)
    collate = model.collator()
    sample = {"id": "s7", "image": images(1)[0], "prompt": f"{SPAN}{SPAN} Describe.", "answer": "x"}
    with pytest.raises(ValueError, match="sample 's7': its prompt holds 2 <ImageHere> markers but the sample has 1"):
        collate([sample])
    with pytest.raises(ValueError, match="sample 's8': its prompt holds 0 <ImageHere> markers but the sample has 1"):
        collate([{**sample, "id": "s8", "prompt": "Describe."}])
    with pytest.raises(ValueError, match="sample 's9' holds \\['speech'\\], which is neither a text field"):
        collate([{**sample, "id": "s9", "speech": torch.zeros(80, 10)}])


def llm_outputs(model, samples: dict):
    """The LLM's logits of every position, and its answer loss (per row) of the same batch."""
    _, _, inputs = spliced(model, samples)
    logits = model.llm(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask).logits
    return logits, model.llm(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask, inputs.labels)


def test_left_padded_row_equals_the_row_alone(model):
    prompts = [f"{SPAN} Describe.", f"Some longer text before {SPAN} and after it, to force padding."]
    pixels = images(2)
    both, both_loss = llm_outputs(model, {"image": pixels, "prompt": prompts, "answer": ["a.", "b c d."]})
    alone, alone_loss = llm_outputs(model, {"image": pixels[1:], "prompt": prompts[1:], "answer": ["b c d."]})
    width = alone.shape[1]
    assert torch.allclose(both[1, -width:], alone[0], atol=1e-5)
    assert torch.allclose(both_loss.row_loss[1], alone_loss.row_loss[0], atol=1e-5)
    assert both_loss.row_units[1] == alone_loss.row_units[0]
    generated = model.generate({"image": pixels, "prompt": prompts}, max_new_tokens=4)
    assert generated[1] == model.generate({"image": pixels[1:], "prompt": prompts[1:]}, max_new_tokens=4)[0]


def test_prompt_overflow_is_refused_or_truncated(micro_model_cfg):
    cfg = OmegaConf.merge(micro_model_cfg, {"llm": {"max_prompt_length": 12}})
    model = build_model(resolve_model(cfg))
    queries = model.interfaces["image"].query_tokens.shape[1]
    long_prompt = {"image": images(1), "prompt": [f"{SPAN} " + "word " * 20], "answer": ["x"]}
    with pytest.raises(ValueError, match="sample '0': a prompt of .* positions exceeds llm.max_prompt_length=12"):
        model(model.make_batch(long_prompt, with_answers=True))
    model.llm.overflow = "truncate"
    # the image comes first: keeping the prompt's last 12 positions would drop it
    with pytest.raises(ValueError, match="sample '0': truncating its .*-position prompt to 12 would cut a media span"):
        model(model.make_batch(long_prompt, with_answers=True))
    model.llm.max_prompt_length = queries + 8
    text_only = model.make_batch({"prompt": ["word " * 30], "answer": ["x"]}, with_answers=True)
    inputs = model.splice(text_only, {})
    prompt = (inputs.labels == IGNORE_INDEX) & (inputs.attention_mask == 1)
    assert prompt.sum().item() == queries + 8
    kept = inputs.input_ids[prompt].tolist()
    assert kept == text_only.input_ids[0][text_only.labels[0] == IGNORE_INDEX].tolist()[-(queries + 8):]
    # an image near the end survives truncation whole, in its place
    late_image = model.make_batch({"image": images(1), "prompt": ["word " * 30 + SPAN], "answer": ["x"]}, True)
    media, _ = model.encode(late_image)
    inputs = model.splice(late_image, media)
    assert ((inputs.labels == IGNORE_INDEX) & (inputs.attention_mask == 1)).sum().item() == queries + 8
    assert torch.equal(inputs.inputs_embeds[0][inputs.media_positions[0]], media["image"][0])
    # the cut falls inside the image's positions: refused
    real = late_image.attention_mask[0] == 1
    slot = int((late_image.media_slots[0] >= 0).nonzero())
    before = int(real[:slot].sum())  # prompt positions before the image
    prompt_positions = int((real & (late_image.labels[0] == IGNORE_INDEX)).sum()) - 1 + queries
    model.llm.max_prompt_length = prompt_positions - before - 1  # keeps all but the image's first position
    with pytest.raises(ValueError, match="would cut a media span"):
        model.splice(late_image, media)


def test_notebook_api_loads_trained_weights(micro_model_cfg, tmp_path):
    from safetensors.torch import save_file

    overrides = {k: v for k, v in micro_model_cfg.items() if k not in ("arch", "model_type")}
    model, processors, txt = load_model_and_preprocess("xllm", "tiny", is_eval=True, device="cpu", **overrides)
    assert not model.training and txt["eval"]("  a   b ") == "a b"
    assert set(processors) == {"image"} and processors["image"]["eval"].image_size == 64  # tiny.yaml's processor
    trained = {"adapters.image.weight": torch.full_like(model.adapters["image"].weight, 0.5)}
    save_file(trained, str(tmp_path / "w.safetensors"))
    reloaded = load_model("xllm", "tiny", checkpoint=tmp_path / "w.safetensors", **overrides)
    assert torch.equal(reloaded.adapters["image"].weight, trained["adapters.image.weight"])
    save_file({"adapters.image.wieght": trained["adapters.image.weight"]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="unexpected key adapters.image.wieght"):
        load_model("xllm", "tiny", checkpoint=tmp_path / "bad.safetensors", **overrides)


def test_the_collator_runs_in_dataloader_workers(model, micro_world):
    """The collator travels to worker processes (pickled under the spawn start method) and lays out there what
    it lays out in the main process."""
    from torch.utils.data import DataLoader

    from xllm.datasets.build import build_split
    from xllm.datasets.config import resolve_datasets

    dataset = build_split(resolve_datasets({"w": {"builder": "coco_caption", **micro_world}}), "val")["w"]
    collator = pickle.loads(pickle.dumps(model.collator()))
    samples = [dataset[i] for i in range(4)]
    expected = model.collator()(samples)
    (in_worker,) = list(DataLoader(samples, batch_size=4, collate_fn=collator, num_workers=1))
    for name in ("input_ids", "attention_mask", "labels", "media_slots"):
        assert torch.equal(getattr(in_worker, name), getattr(expected, name)), name
    assert torch.equal(in_worker.media["image"], expected.media["image"]) and in_worker.ids == expected.ids


def test_an_answer_over_the_budget_keeps_its_start_and_its_end_token(micro_model_cfg, caplog):
    import logging

    from xllm.models.builder import build_model
    from xllm.models.config import resolve_model
    from xllm.processors.batch import IGNORE_INDEX

    long = " ".join(["a red circle on the left"] * 20)
    sample = {"id": "long", "image": torch.zeros(3, 32, 32), "prompt": "<Image><ImageHere></Image> Describe.",
              "answer": long}
    full = build_model(resolve_model(micro_model_cfg)).collator()([sample])
    with caplog.at_level(logging.WARNING):
        cut = build_model(resolve_model({**micro_model_cfg, "llm": {**micro_model_cfg["llm"],
                                                                    "max_answer_length": 5}})).collator()([sample])
    full_answer = full.labels[0][full.labels[0] != IGNORE_INDEX].tolist()
    cut_answer = cut.labels[0][cut.labels[0] != IGNORE_INDEX].tolist()
    assert len(full_answer) > 5 and cut_answer == full_answer[:4] + full_answer[-1:]
    assert f"answer of {len(full_answer)} tokens cut to 5" in caplog.text
