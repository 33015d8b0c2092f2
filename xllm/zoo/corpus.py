"""The world's text, as the tiny LLM reads it before any image is shown to it.

A real LLM arrives knowing its language and able to repeat, summarise and answer from what its prompt says.
The tiny LLM learns the same from three kinds of documents: scene captions; questions answered from a caption
given in the prompt; and a caption wrapped in a media span (``<Image>…</Image>``) that the answer repeats,
which is the reading skill an interface's "foreign language" embeddings later rely on.
"""

from __future__ import annotations

import random

from xllm.datasets.world.scenes import caption_en, caption_zh, question_answers, sample_scene

DESCRIBE_EN = ("Describe the image.", "What is in the picture?", "Describe the scene briefly.")
DESCRIBE_ZH = ("描述这张图片。", "图片里有什么？")


def conversations(rng: random.Random) -> list[tuple[str, str]]:
    """One document: (user, assistant) turns about one random scene."""
    scene = sample_scene(rng)
    kind = rng.random()
    if kind < 0.45:
        english = rng.random() < 0.75
        caption = caption_en(scene) if english else caption_zh(scene)
        question = rng.choice(DESCRIBE_EN if english else DESCRIBE_ZH)
        return [(f"<Image>{caption}</Image> {question}", caption)]
    if kind < 0.65:
        return [(rng.choice(DESCRIBE_EN), caption_en(scene))]
    qa = question_answers(scene, rng)
    turns = [(f"{caption_en(scene)} {qa[0][0]}", qa[0][1])]
    return turns + [(q, a) for q, a in qa[1:] if rng.random() < 0.5]
