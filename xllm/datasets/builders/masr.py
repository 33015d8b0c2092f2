"""Multimodal ASR (X-LLM's mASR): one prompt holding an image and speech about it; the answer is the transcript.

The ``world_masr`` builder reads the world's speech corpus as ``world_speech`` does and gives each utterance
the image of the scene its transcript describes, drawn by the world's renderer. Samples are the speech
instruction samples plus ``image`` (a [3, image_size, image_size] tensor):
``{"id", "speech", "image", "prompt", "answer", "lang"}``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from xllm.datasets.registry import register_builder
from xllm.datasets.builders.asr import ASRRecord
from xllm.datasets.builders.speech_instruction import (SpeechInstructionDataset, WorldSpeechBuilder,
                                                       WorldSpeechConfig, prompts_of)
from xllm.world.render import render
from xllm.world.scenes import Scene, caption
from xllm.world.speech_corpus import spoken_scenes
from xllm.processors.audio import AudioProcessor
from xllm.processors.image import ImageProcessor


def scene_image(scene: Scene, utt_id: str, seed: int, size: int) -> Image.Image:
    """The picture of an utterance's scene; seeded by the corpus seed and the utterance, so always the same one."""
    return render(scene, size, random.Random(f"masr/{seed}/{utt_id}"))


class WorldMASRDataset(SpeechInstructionDataset):
    """The world's utterances, each with the picture of the scene it speaks about."""

    modality = "image+speech"  # batched apart from speech alone: a batch then runs one set of encoders

    def __init__(self, records: list[ASRRecord], processor: AudioProcessor, prompts: dict[str, list[str]],
                 lang: str, training: bool, scenes: dict[str, Scene], image_processor: ImageProcessor,
                 seed: int) -> None:
        super().__init__(records, processor, prompts, lang, training)
        for record in records:
            scene = scenes.get(record.utt_id)
            if scene is None:
                raise ValueError(f"utterance {record.utt_id!r} is not one of the world spec's utterances, so its "
                                 "scene is unknown: was the corpus folder ('storage') written by another spec?")
            # The image must show what the speech says: a transcript that is not its scene's caption means the
            # corpus and the spec disagree, and the sample would teach the model a wrong pairing.
            expected = caption(scene, self.language(record))
            if expected != record.text:
                raise ValueError(f"utterance {record.utt_id!r}: transcript {record.text!r} is not the caption of "
                                 f"its scene ({expected!r})")
        self.scenes, self.image_processor, self.seed = scenes, image_processor, seed

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        utt_id = sample["id"]
        image = scene_image(self.scenes[utt_id], utt_id, self.seed, self.image_processor.image_size)
        return {**sample, "image": self.image_processor(image)}


@dataclass
class WorldMASRConfig(WorldSpeechConfig):
    prompts: dict[str, list[str]] = field(default_factory=lambda: {  # per language; the first evaluates
        "en": ["<Image><ImageHere></Image> <Speech><SpeechHere></Speech> Transcribe the speech about the image."],
        "zh": ["<Image><ImageHere></Image><Speech><SpeechHere></Speech>请忠实地识别该语音"]})
    image_size: int = 224  # the image encoder's input size; the scene is drawn at it


@register_builder("world_masr")
class WorldMASRBuilder(WorldSpeechBuilder):
    Config = WorldMASRConfig

    def build(self, split: str) -> WorldMASRDataset:
        cfg = self.cfg
        scenes = {utt_id: scene for utt_id, scene, _ in spoken_scenes(self.spec)}
        return WorldMASRDataset(self.records(split), AudioProcessor.from_config(dict(cfg.audio)), prompts_of(cfg),
                                cfg.lang, training=split == "train", scenes=scenes,
                                image_processor=ImageProcessor(cfg.image_size), seed=self.spec.seed)
