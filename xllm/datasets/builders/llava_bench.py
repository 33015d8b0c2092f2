"""LLaVA-Bench (COCO): LLaVA's 90 questions (``qa90_questions.jsonl``) about 30 COCO val2014 images, to answer.

A question names its image ``000000441147.jpg`` (what LLaVA opens); COCO's own files are called
``COCO_val2014_000000441147.jpg``, so the image folder may hold either name. A question whose image is under
neither is kept, with the reason, and yields no image: the answer file records it as unanswered instead of the
benchmark silently shrinking. The benchmark has one split, ``test``; its answers are scored by an LLM judge
(``python -m xllm.eval.llava_bench judge``), not by a metric.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from xllm.common.config import path_field
from xllm.common.paths import read_utf8, resolve_path
from xllm.datasets.registry import register_builder
from xllm.processors.image import ImageProcessor

log = logging.getLogger(__name__)
COCO_PREFIX = "COCO_val2014_"


@dataclass
class LlavaBenchConfig:
    # The benchmark folder (LLaVA's files as released). The default holds for a checkout beside the project's
    # shared folder, run from the checkout; relative paths are relative to the working folder, as everywhere.
    root: str = path_field("folder", default="../shared/benchmarks/llava_bench_coco")
    questions: str = "qa90_questions.jsonl"  # relative to root
    images: str = "images"  # the image folder, relative to root (or absolute: COCO's val2014 folder)
    prompt: str = "<Image><ImageHere></Image> {question}"  # the question placed after the image
    image_size: int = 224  # the image encoder's input size


@dataclass
class BenchQuestion:
    question_id: int
    image: str  # the file name the question gives
    text: str
    category: str
    image_path: Path | None  # the file found; None when neither name is in the image folder
    missing: str | None  # why there is no image, naming the files looked for


def image_names(name: str) -> tuple[str, str]:
    """The two names an image may have: the question's (``000000441147.jpg``) and COCO's
    (``COCO_val2014_000000441147.jpg``)."""
    short = name[len(COCO_PREFIX):] if name.startswith(COCO_PREFIX) else name
    return short, COCO_PREFIX + short


def read_questions(path: Path, image_folder: Path) -> list[BenchQuestion]:
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA-Bench question file not found: {path}")
    questions = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            fields = [record[k] for k in ("question_id", "image", "text", "category")]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object: {error}") from None
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: a question needs question_id, image, text and category; "
                             f"lacks {error}") from None
        names = image_names(record["image"])
        found = next((image_folder / n for n in names if (image_folder / n).is_file()), None)
        missing = None if found else f"image missing: neither {names[0]} nor {names[1]} is in {image_folder}"
        questions.append(BenchQuestion(*fields, image_path=found, missing=missing))
    return questions


class LlavaBenchDataset(Dataset):
    """Every question in order: ``{"id", "question_id", "question", "category", "prompt", "image"}`` with the image
    tensor, or None and ``unanswered`` giving the reason when its image is missing."""

    def __init__(self, questions: list[BenchQuestion], processor: ImageProcessor, prompt: str) -> None:
        self.questions, self.processor, self.prompt = questions, processor, prompt

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        q = self.questions[index]
        return {"id": str(q.question_id), "question_id": q.question_id, "question": q.text, "category": q.category,
                "prompt": self.prompt.format(question=q.text), "unanswered": q.missing,
                "image": None if q.image_path is None else self.processor(q.image_path)}


@register_builder("llava_bench")
class LlavaBenchBuilder:
    Config = LlavaBenchConfig
    # Answers are scored by the judge: a metric that says so (evaluate.py cannot score this benchmark).
    metric = "xllm.eval.llava_bench.requires_judge"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def build(self, split: str) -> LlavaBenchDataset:
        if split != "test":
            raise ValueError(f"LLaVA-Bench has one split, 'test'; asked for {split!r}")
        root = resolve_path(self.cfg.root)
        if not root.is_dir():
            raise FileNotFoundError(f"LLaVA-Bench folder not found: {root} (datasets.<name>.root, or --bench-dir)")
        image_folder = root / self.cfg.images
        questions = read_questions(root / self.cfg.questions, image_folder)
        for name in sorted({q.image for q in questions if q.missing}):
            ids = [q.question_id for q in questions if q.image == name]
            log.warning("LLaVA-Bench image %s (questions %s) is not in %s: its questions stay unanswered",
                        name, ", ".join(map(str, ids)), image_folder)
        return LlavaBenchDataset(questions, ImageProcessor(self.cfg.image_size), self.cfg.prompt)
