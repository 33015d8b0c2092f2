"""Questions about the world's images, in one round or as a dialogue that first describes the image.

Reads the same caption JSON as ``coco_caption`` (the world writes ``qa`` pairs and ``scene`` into each record).
``mode: qa`` asks each question with the image in the prompt; ``mode: dialogue`` puts a first round in
``history`` (the image and its caption) and asks the question in the second, so the backend's
``format_prompt(query, history)`` lays out the rounds: ChatGLM's ``[Round i]\\n问：…\\n答：…`` or a chat template.
Chinese (``lang: zh``) asks how many shapes there are, with ``caption_zh`` as the first answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from xllm.datasets.lengths import text_length
from xllm.datasets.registry import register_builder
from xllm.common.config import choice
from xllm.datasets.builders.caption import CaptionBuilderConfig, CocoCaptionBuilder, not_text
from xllm.world.scenes import NUMBER_ZH
from xllm.processors.image import ImageProcessor

@dataclass
class WorldQAConfig(CaptionBuilderConfig):
    mode: str = choice("qa", "dialogue")
    question_prompt: str = "<Image><ImageHere></Image> {question}"  # qa mode: the image with the question
    describe_prompt: str = "<Image><ImageHere></Image> Describe the image."  # dialogue mode: the first round


def question_answers(record: dict, lang: str) -> list[tuple[str, str]]:
    if lang == "zh":
        return [("图片里有几个图形？", f"{NUMBER_ZH[len(record['scene']['shapes'])]}个。")]
    return [tuple(pair) for pair in record["qa"]]


class WorldQADataset(Dataset):
    def __init__(self, records: list[dict], cfg, processor: ImageProcessor, image_root) -> None:
        self.cfg, self.processor, self.image_root = cfg, processor, image_root
        self.items = [(record, q, a) for record in records for q, a in question_answers(record, cfg.lang)]

    modality = "image"

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[float]:
        """Text units per item (``xllm.datasets.lengths``): the question and answer, and in a dialogue the first
        round (the describing prompt and the caption) too."""
        cfg = self.cfg
        if cfg.mode == "qa":
            return [text_length(cfg.question_prompt.format(question=q)) + text_length(a) for _, q, a in self.items]
        return [text_length(cfg.describe_prompt) + text_length(record[cfg.caption_field]) + text_length(q)
                + text_length(a) for record, q, a in self.items]

    def __getitem__(self, index: int) -> dict:
        record, question, answer = self.items[index]
        sample = {"id": f"{record['image_id']}/{index}", "image": self.processor(self.image_root / record["image"]),
                  "answer": answer}
        if self.cfg.mode == "qa":
            return {**sample, "prompt": self.cfg.question_prompt.format(question=question)}
        return {**sample, "prompt": question, "history": [(self.cfg.describe_prompt, record[self.cfg.caption_field])]}


@register_builder("world_qa")
class WorldQABuilder(CocoCaptionBuilder):
    Config = WorldQAConfig

    def build(self, split: str) -> WorldQADataset:
        records, image_root, annotations, dropped = self.records(split)
        for index, record in enumerate(records):
            if "qa" not in record or "scene" not in record:
                raise ValueError(f"record {index} in {annotations} lacks the world's "
                                 "'qa'/'scene' fields: world_qa reads the synthetic world's caption JSON")
            pairs = record["qa"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and not any(map(not_text, p))
                                                      for p in pairs):
                raise ValueError(f"record {index} in {annotations}: field 'qa' must be a list of [question, answer] "
                                 f"pairs of non-empty strings, got {pairs!r}"[:300])
        dataset = WorldQADataset(records[: self.cfg.max_samples], self.cfg, self.processor(), image_root)
        dataset.dropped_records = dropped  # reported only: its samples are questions, several per record
        return dataset
