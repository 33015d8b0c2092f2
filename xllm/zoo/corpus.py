"""The world's text, as the tiny LLM reads it before any image, video or signal is shown to it.

A real LLM arrives knowing its language and able to repeat and answer from what its prompt says; an
interface's "foreign language" embeddings rely on exactly that reading skill. The tiny LLM learns both from:
- documents of the world: scene captions, questions answered from a caption in the prompt, motion captions,
  device-status replies, multi-turn dialogues, and captions wrapped in media spans (``<Image>…</Image>``,
  ``<Speech>…</Speech>`` with the transcription prompt) that the answer repeats;
- copy drills: random strings of the world's words in a media span, repeated by the answer. Their words
  cannot be guessed from the world's regularities, so the only way to predict them is to read the span;
  this grows the attention heads that copy (induction heads) in a few hundred steps, where world captions
  alone leave the model guessing colours and kinds from its priors.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import lru_cache

from xllm.world.device import answer, sample_status
from xllm.world.motion import motion_caption_en, sample_motion
from xllm.world.scenes import POSITIONS, Scene, caption_en, caption_zh, question_answers, sample_scene
from xllm.zoo.tiny_chatglm import WORDS_ZH

DESCRIBE_EN = ("Describe the image.", "What is in the picture?", "Describe the scene briefly.")
DESCRIBE_ZH = ("描述这张图片。", "图片里有什么？")
DESCRIBE_VIDEO = ("Describe the video.", "What happens in the video?")
ASK_DEVICE = ("What should I do?", "Check the device status.")
TRANSCRIBE_EN = ("Transcribe the speech.",)
TRANSCRIBE_ZH = ("请忠实地识别该语音",)  # X-LLM's Chinese ASR prompt, written right after the span
# The question a copy drill asks after each kind of span: the instructions that stage 2 will use.
SPAN_QUESTIONS = {"Image": DESCRIBE_EN, "Video": DESCRIBE_VIDEO, "Signal": ASK_DEVICE, "Speech": TRANSCRIBE_EN}


def conversations(rng: random.Random) -> list[tuple[str, str]]:
    """One document of (user, assistant) turns about one random scene."""
    scene = sample_scene(rng)
    kind = rng.random()
    if kind < 0.45:
        # A caption shown, or spoken (the world's speech says its captions): the answer repeats it.
        english = rng.random() < 0.75
        caption = caption_en(scene) if english else caption_zh(scene)
        if rng.random() < 0.3:
            question = rng.choice(TRANSCRIBE_EN) if english else rng.choice(TRANSCRIBE_ZH)
            return [(f"<Speech>{caption}</Speech>{' ' if english else ''}{question}", caption)]
        question = rng.choice(DESCRIBE_EN if english else DESCRIBE_ZH)
        return [(f"<Image>{caption}</Image> {question}", caption)]
    if kind < 0.65:
        return [(rng.choice(DESCRIBE_EN), caption_en(scene))]
    qa = question_answers(scene, rng)
    return [(f"{caption_en(scene)} {qa[0][0]}", qa[0][1])] + [(q, a) for q, a in qa[1:] if rng.random() < 0.5]


def motion_document(rng: random.Random) -> list[tuple[str, str]]:
    motion = sample_motion(rng)
    caption = motion_caption_en(motion)
    question = rng.choice(DESCRIBE_VIDEO)
    if rng.random() < 0.5:
        return [(f"<Video>{caption}</Video> {question}", caption)]
    # Where the shape starts and ends, as two frame captions: the LLM learns to say which way it went.
    first, last = (Scene(tuple(sorted((mover, *motion.still), key=lambda s: POSITIONS.index(s.position))))
                   for mover in (motion.mover, replace(motion.mover, position=motion.end)))
    return [(f"<Video>{caption_en(first)} {caption_en(last)}</Video> {question}", caption)]


def device_document(rng: random.Random) -> list[tuple[str, str]]:
    state, _ = sample_status(rng)
    reply = answer(state)
    question = rng.choice(ASK_DEVICE)
    return [(f"<Signal>{reply}</Signal> {question}" if rng.random() < 0.7 else question, reply)]


def dialogue_document(rng: random.Random) -> list[tuple[str, str]]:
    scene = sample_scene(rng)
    caption = caption_en(scene)
    turns = [(f"<Image>{caption}</Image> Describe the image.", caption)]
    return turns + [(q, a) for q, a in question_answers(scene, rng) if rng.random() < 0.6]


@lru_cache(maxsize=1)
def world_words() -> tuple[str, ...]:
    """The English words of the world's captions and replies, in a fixed order."""
    rng = random.Random("words")
    texts = [caption_en(sample_scene(rng)) for _ in range(300)]
    texts += [motion_caption_en(sample_motion(rng)) for _ in range(300)]
    texts += [answer(sample_status(rng)[0]) for _ in range(100)]
    return tuple(sorted({w.strip(".,:") for text in texts for w in text.split()} - {""}))


def copy_drill(rng: random.Random) -> list[tuple[str, str]]:
    """English words, or a quarter of the time the Chinese captions' words (written without spaces), whose
    pieces need copying heads of their own."""
    count = rng.randint(2, 10)
    if rng.random() < 0.25:
        words = "".join(rng.choice(WORDS_ZH) for _ in range(count))
    else:
        words = " ".join(rng.choice(world_words()) for _ in range(count))
    span = rng.choice(tuple(SPAN_QUESTIONS))
    return [(f"<{span}>{words}</{span}> {rng.choice(SPAN_QUESTIONS[span])}", words)]


def world_documents(rng: random.Random) -> list[tuple[str, str]]:
    """One document of the tiny LLM's pre-training corpus."""
    kind = rng.random()
    for below, document in ((0.5, copy_drill), (0.75, conversations), (0.85, motion_document), (0.92, device_document)):
        if kind < below:
            return document(rng)
    return dialogue_document(rng)
