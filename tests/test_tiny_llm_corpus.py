"""The tiny LLM's pre-training rows: what it reads must be what stage 2 shows it, with text where media go."""

import random

import pytest
from omegaconf import OmegaConf

from xllm.world.scenes import caption_en, caption_zh, sample_scene
from xllm.processors.batch import IGNORE_INDEX
from xllm.models.config import LLMConfig
from xllm.models.llm.hf_causal import HFCausalLM
from xllm.processors.collator import marker, media_span
from xllm.zoo.corpus import SPAN_QUESTIONS, copy_drill, world_documents
from xllm.zoo.tiny_llm import MEDIA_SPAN, chat_row, render_chat


@pytest.fixture(scope="module")
def backend(micro_zoo) -> HFCausalLM:
    cfg = OmegaConf.merge(OmegaConf.structured(LLMConfig), {"path": str(micro_zoo["llm"]), "dtype": "float32"})
    return HFCausalLM.from_config(cfg)


@pytest.mark.parametrize("span, question, lang", [
    ("Image", " Describe the image.", "en"), ("Speech", " Transcribe the speech.", "en"),
    ("Speech", "请忠实地识别该语音", "zh")])
def test_a_row_is_the_stage2_sequence_with_the_caption_in_the_slots(backend, span, question, lang):
    scene = sample_scene(random.Random(3))
    caption = caption_en(scene) if lang == "en" else caption_zh(scene)
    ids, labels = chat_row(backend.tokenizer, [(f"<{span}>{caption}</{span}>{question}", caption)])
    # The composite tokenises the text around the medium's slots; here the caption's tokens fill them.
    medium = span.lower()
    before, after = backend.layout.format_prompt(f"{media_span(medium)}{question}").split(marker(medium))
    prompt = backend.layout.tokenize(before) + backend.layout.tokenize(caption) + backend.layout.tokenize(after)
    assert (ids, labels) == backend.layout.build_sequence(prompt, caption)


def test_rows_spell_the_rendered_chat_with_loss_on_answers_only(backend):
    tokenizer = backend.tokenizer
    rng = random.Random(0)
    for _ in range(50):
        turns = world_documents(rng)
        ids, labels = chat_row(tokenizer, turns)
        assert len(ids) == len(labels)
        assert tokenizer.decode(ids) == render_chat(turns).removesuffix("\n")
        answers = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert answers == [i for i, label in zip(ids, labels) if label == i]
        assert tokenizer.decode(answers) == "".join(f"{answer}<|end|>" for _, answer in turns)


def test_copy_drills_repeat_their_span_after_each_mediums_question():
    rng = random.Random(1)
    seen = set()
    for _ in range(400):
        (query, answer), = copy_drill(rng)
        span = MEDIA_SPAN.match(query)
        assert span and span["contents"] == answer
        assert query[span.end():].strip() in SPAN_QUESTIONS[span["name"]]
        seen.add((span["name"], " " in answer))
    # Every medium, with English (spaced) and Chinese (unspaced) words.
    assert seen == {(name, spaced) for name in SPAN_QUESTIONS for spaced in (True, False)}
