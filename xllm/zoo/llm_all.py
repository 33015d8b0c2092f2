"""``zoo:tiny/llm_all``: the tiny LLM that also knows the world's motion and device-status language.

The image-only tiny LLM (``zoo:tiny/llm``) never read "moves to the right" or "enable power saving"; a real
LLM arrives knowing such words. This one reads the same documents as the image LLM plus motion captions,
device-status answers (both also wrapped in media spans that the answer repeats, the reading skill an
interface relies on) and multi-turn dialogues about an image, so video, signal and stage-3 runs share it.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from xllm.datasets.world.device import answer, sample_status
from xllm.datasets.world.motion import motion_caption_en, sample_motion
from xllm.datasets.world.scenes import POSITIONS, Scene, caption_en, question_answers, sample_scene
from xllm.zoo.corpus import conversations

DESCRIBE_VIDEO = ("Describe the video.", "What happens in the video?")
ASK_DEVICE = ("What should I do?", "Check the device status.")


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


def world_conversations(rng: random.Random) -> list[tuple[str, str]]:
    """One document of the whole world's text."""
    kind = rng.random()
    if kind < 0.5:
        return conversations(rng)
    if kind < 0.7:
        return motion_document(rng)
    if kind < 0.85:
        return device_document(rng)
    return dialogue_document(rng)


def build_llm_all(folder: Path, recipe) -> None:
    from xllm.zoo.tiny import build_llm

    build_llm(folder, recipe, documents=world_conversations)
