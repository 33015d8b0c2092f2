"""The tiny tier's ChatGLM: its SentencePiece vocabulary, its checkpoint folder, and the ``chatglm`` backend
inside the composite model (prompt layout, labels, media slots, left padding, generation, training)."""

import json
import pickle
import random

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import MICRO_QFORMER
from xllm.config import load_config
from xllm.models.config import LLMConfig, resolve_model
from xllm.datasets.build import build_split
from xllm.datasets.loader import training_loader
from xllm.world.scenes import caption_en, caption_zh, sample_scene
from xllm.models.builder import build_model
from xllm.processors.batch import IGNORE_INDEX
from xllm.models.llm.chatglm_backend import ChatGLMBackend
from xllm.models.llm.chatglm_tokenizer import ChatGLMTokenizer
from xllm.runners.runner import Runner
from xllm.tasks.base import LLMTask
from xllm.zoo.tiny_chatglm import CONTROL_PIECES, LOOKS, TOKENIZER_FILE, alike

SPAN = "<Image><ImageHere></Image>"


@pytest.fixture(scope="module")
def chatglm_folder(micro_chatglm):
    return micro_chatglm


@pytest.fixture(scope="module")
def model_cfg(chatglm_folder, micro_zoo) -> dict:
    return {
        "arch": "xllm", "model_type": "tiny_zh",
        "llm": {"backend": "chatglm", "path": str(chatglm_folder)},
        "modalities": {"image": {"encoder": {"name": "blip2_vision", "path": str(micro_zoo["image_encoder"])},
                                 "interface": {"name": "qformer", **MICRO_QFORMER}}},
        "trainable": ["interfaces.image", "adapters.image"],
    }


@pytest.fixture(scope="module")
def model(model_cfg):
    torch.manual_seed(0)
    return build_model(resolve_model(OmegaConf.create(model_cfg)))


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def world_captions(n: int) -> list:
    rng = random.Random(7)
    return [sample_scene(rng) for _ in range(n)]


# --------------------------------------------------------------------------- vocabulary and checkpoint


def test_alike_scenes_differ_in_one_attribute_only():
    rng = random.Random(0)
    assert set(LOOKS) == {"kind", "colour", "size"}
    attributes = LOOKS
    for _ in range(50):
        scene = sample_scene(rng)
        same = alike(scene, rng)
        first = scene.shapes[0]
        kept = [name for name in attributes
                if all(getattr(new, name) == getattr(old, name) for new, old in zip(same.shapes, scene.shapes))
                and all(getattr(new, other) == getattr(first, other)
                        for new in same.shapes for other in attributes if other != name)]
        assert kept, (scene, same)
        assert [shape.position for shape in same.shapes] == [shape.position for shape in scene.shapes]


def test_tokenizer_round_trips_the_worlds_captions(chatglm_folder):
    backend = ChatGLMBackend.from_pretrained(chatglm_folder)
    for scene in world_captions(50):
        for caption in (caption_zh(scene), caption_en(scene)):
            ids = backend.layout.tokenize(caption)
            assert backend.tokenizer.unk_token_id not in ids
            assert backend.decode(ids) == caption


def test_special_ids_agree_between_tokenizer_and_config(chatglm_folder):
    tokenizer = ChatGLMTokenizer.from_pretrained(chatglm_folder)
    config = json.loads((chatglm_folder / "config.json").read_text())
    pieces = {"mask_token_id": "[MASK]", "gmask_token_id": "[gMASK]", "bos_token_id": "<sop>",
              "eos_token_id": "<eop>", "pad_token_id": "<pad>"}
    for key, piece in pieces.items():
        assert config[key] == getattr(tokenizer, key) == tokenizer.sp.piece_to_id(piece)
        assert tokenizer.sp.id_to_piece(config[key]) == piece
    assert config["vocab_size"] == tokenizer.vocab_size
    for piece in (*CONTROL_PIECES, "<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>"):
        assert tokenizer.sp.id_to_piece(tokenizer.sp.piece_to_id(piece)) == piece
    # control pieces vanish when decoded; newlines and space runs survive through <n> and <|blank_k|>
    text = "问：你好\n答：  好"
    assert tokenizer.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.tokenize(text))
    assert tokenizer.decode(tokenizer.tokenize(text)) == "问:你好\n答:  好"


def test_special_pieces_in_text_are_found_by_name(chatglm_folder):
    tokenizer = ChatGLMTokenizer.from_pretrained(chatglm_folder)
    assert tokenizer.bos_token_id != 130004  # the tiny vocabulary holds <sop> at another id
    assert tokenizer.tokenize("你好 <sop> 好") == (tokenizer.tokenize("你好") + [tokenizer.bos_token_id]
                                                + tokenizer.tokenize("好"))
    assert tokenizer.tokenize("[MASK]<eop>") == [tokenizer.mask_token_id, tokenizer.eos_token_id]


def test_checkpoint_folder_is_the_original_layout(chatglm_folder):
    assert (chatglm_folder / TOKENIZER_FILE).is_file() and (chatglm_folder / "tokenizer_config.json").is_file()
    state = load_file(chatglm_folder / "model.safetensors")
    assert torch.equal(state["lm_head.weight"], state["transformer.word_embeddings.weight"])
    assert "transformer.layers.1.attention.query_key_value.weight" in state


def test_from_config_reads_the_llm_section(chatglm_folder):
    cfg = OmegaConf.structured(LLMConfig(backend="chatglm", path=str(chatglm_folder), dtype="bfloat16",
                                         max_prompt_length=64, overflow="truncate"))
    backend = ChatGLMBackend.from_config(cfg)
    assert backend.model.dtype == torch.bfloat16
    assert (backend.max_prompt_length, backend.overflow) == (64, "truncate")
    with pytest.raises(FileNotFoundError, match="llm.path 'zoo:tiny/absent'.*python -m xllm.zoo build tiny"):
        ChatGLMBackend.from_config(OmegaConf.structured(LLMConfig(backend="chatglm", path="zoo:tiny/absent")))
    with pytest.raises(ValueError, match="not GGUF"):
        ChatGLMBackend.from_config(OmegaConf.structured(LLMConfig(path=str(chatglm_folder), gguf_file="m.gguf")))
    with pytest.raises(ValueError, match="llm.system_prompt=''.*no system turn"):
        ChatGLMBackend.from_config(OmegaConf.structured(LLMConfig(path=str(chatglm_folder), system_prompt="")))


# --------------------------------------------------------------------------- inside the composite


def test_prompt_layout_and_labels(model):
    llm = model.llm
    tokenizer = llm.tokenizer
    samples = {"image": images(2), "prompt": [f"{SPAN}请描述这张图片。", f"看：{SPAN}"],
               "answer": ["中间有一个小的红色圆形。", "左侧有一个大的蓝色星形。"]}
    batch = model.make_batch(samples, with_answers=True)
    inputs = model.splice(batch, model.encode(batch)[0])
    queries = MICRO_QFORMER["num_query_tokens"]
    layout = llm.layout
    for row, (prompt, answer) in enumerate(zip(samples["prompt"], samples["answer"])):
        before, after = layout.format_prompt(prompt).split("<ImageHere>")
        real = inputs.attention_mask[row].bool()
        ids, slots, labels = inputs.input_ids[row][real], inputs.media_positions[row][real], inputs.labels[row][real]
        answer_ids = layout.tokenize(answer) + [tokenizer.eos_token_id]
        expected = (layout.tokenize(before) + [layout.pad_token_id] * queries + layout.tokenize(after)
                    + [tokenizer.gmask_token_id, tokenizer.bos_token_id] + answer_ids)
        assert ids.tolist() == expected
        start = len(layout.tokenize(before))
        assert slots.nonzero().flatten().tolist() == list(range(start, start + queries))
        assert labels.tolist() == [IGNORE_INDEX] * (len(expected) - len(answer_ids)) + answer_ids
    assert layout.format_prompt(samples["prompt"][0]) == f"问：{SPAN}请描述这张图片。\n答："


def test_prompt_overflow_keeps_the_prompts_end_and_its_gmask_sop(model, caplog):
    tokenizer = model.llm.tokenizer
    queries = MICRO_QFORMER["num_query_tokens"]
    text = {"prompt": ["很长的问题" * 6], "answer": ["好。"]}
    batch = model.make_batch(text, with_answers=True)
    prompt = batch.input_ids[0][(batch.attention_mask[0] == 1) & (batch.labels[0] == IGNORE_INDEX)].tolist()
    model.llm.max_prompt_length = 8
    try:
        with pytest.raises(ValueError, match=f"a prompt of {len(prompt)} positions exceeds llm.max_prompt_length=8"):
            model(batch)
        model.llm.overflow = "truncate"
        inputs = model.splice(batch, {})
        kept = inputs.input_ids[0][(inputs.attention_mask[0] == 1) & (inputs.labels[0] == IGNORE_INDEX)].tolist()
        assert kept == prompt[-8:] and kept[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
        assert "truncated to its last 8" in caplog.text
        with pytest.raises(ValueError, match="media span"):
            model(model.make_batch({**text, "image": images(1), "prompt": [SPAN + "很长的问题" * 6]}, True))
        model.llm.max_prompt_length = queries + 20  # the image and the text after it
        late = model.make_batch({**text, "image": images(1), "prompt": ["很长的问题" * 6 + SPAN]}, True)
        assert int(model.splice(late, model.encode(late)[0]).media_positions.sum()) == queries
    finally:
        model.llm.max_prompt_length, model.llm.overflow = None, "refuse"


def test_media_embeddings_fill_the_slots(model):
    samples = {"image": images(2), "prompt": [f"{SPAN}请描述这张图片。"] * 2, "answer": ["好。", "好的。"]}
    batch = model.make_batch(samples, with_answers=True)
    media, _ = model.encode(batch)
    inputs = model.splice(batch, media)
    slots = inputs.media_positions
    for row in range(2):
        assert torch.equal(inputs.inputs_embeds[row][slots[row]], media["image"][row])
    assert torch.equal(inputs.inputs_embeds[~slots], model.llm.embed(inputs.input_ids)[~slots])


def llm_outputs(model, samples: dict):
    """The LLM's logits of every position, and its answer loss (per row) of the same batch."""
    batch = model.make_batch(samples, with_answers=True)
    inputs = model.splice(batch, model.encode(batch)[0])
    logits = model.llm(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask).logits
    return logits, model.llm(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask, inputs.labels)


def test_left_padded_row_equals_the_row_alone(model):
    prompts = [f"{SPAN}请描述这张图片。", f"{SPAN}图片里有什么？请仔细地描述每一个图形。"]
    answers = ["右上角有一个大的青色菱形，下方有一个小的黄色十字。", "中间有一个小的红色圆形。"]
    pictures = images(2)
    with torch.no_grad():
        together, together_loss = llm_outputs(model, {"image": pictures, "prompt": prompts, "answer": answers})
        for row in range(2):
            alone, alone_loss = llm_outputs(model, {"image": pictures[row:row + 1], "prompt": prompts[row:row + 1],
                                                    "answer": answers[row:row + 1]})
            width = alone.shape[1]
            assert (together[row, -width:] - alone[0]).abs().max() <= 1e-4
            assert torch.allclose(together_loss.row_loss[row], alone_loss.row_loss[0], atol=1e-4)
    assert together_loss.loss.isfinite()


def test_generation_through_the_composite(model):
    prompts = [f"{SPAN}请描述这张图片。", f"看这张图：{SPAN}里面有什么？"]
    pictures = images(2)
    together = model.generate({"image": pictures, "prompt": prompts}, max_new_tokens=6)
    alone = [model.generate({"image": pictures[i:i + 1], "prompt": prompts[i:i + 1]}, max_new_tokens=6)[0]
             for i in range(2)]
    assert together == alone and all(isinstance(text, str) for text in together)
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate({"image": pictures, "prompt": prompts}, max_new_tokens=2, num_beams=2)


def test_training_steps_change_only_the_trainable_parameters(tmp_path, model_cfg, micro_world):
    config = {"model": model_cfg,
              "datasets": {"world": {"builder": "coco_caption", **micro_world, "caption_field": "caption_zh",
                                     "lang": "zh", "prompts": [f"{SPAN}请描述这张图片。"]}},
              "run": {"output_dir": str(tmp_path / "run"), "log_interval": 1, "lr": 1e-2, "warmup_steps": 0,
                      "batch_size": 4, "max_steps": 3, "seed": 3}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    cfg = load_config(path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    loader = training_loader(build_split(cfg.datasets, "train")["world"], model.collator(), cfg.run.batch_size,
                             cfg.run.seed)
    runner = Runner(cfg.run, model, LLMTask(cfg.run), loader)
    runner.train()
    after = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("interfaces.image.", "adapters.image.")) for name in trainable)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= trainable
    assert not any(name.startswith("llm.") for name in changed)


def test_the_chatglm_collator_pickles(model):
    collator = pickle.loads(pickle.dumps(model.collator()))
    samples = [{"id": "a", "image": images(1)[0], "prompt": f"{SPAN}请描述这张图片。", "answer": "好。"}]
    assert torch.equal(collator(samples).input_ids, model.collator()(samples).input_ids)
