"""Image-text datasets: COCO-caption style JSON with image files, and webdataset shards.

Both yield ``{"id", "image", "prompt", "answer"}`` samples; the prompt places the image with a media span and
the answer is the caption. With ``world`` set, the synthetic world is written into ``storage`` first (once).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import webdataset as wds
from torch.utils.data import Dataset, IterableDataset

from xllm.common.config import choice
from xllm.common.paths import cache_dir, resolve_path, spec_digest
from xllm.datasets.registry import register_builder
from xllm.world.images import WorldImageSpec, write_world_images
from xllm.processors.image import ImageProcessor

log = logging.getLogger(__name__)


@dataclass
class CaptionBuilderConfig:
    storage: str = ""  # the data folder; empty with ``world`` set: a cache folder named by the world's spec
    world: dict[str, Any] | None = None  # WorldImageSpec fields: generate the synthetic world into ``storage``
    annotations: str = "annotations/{split}.json"  # relative to storage; ``{split}`` is train/val/test
    image_root: str = ""  # where the records' image paths start, relative to storage
    caption_field: str = "caption"  # e.g. "caption_zh" for the world's Chinese captions
    lang: str = "en"  # the captions' language, for evaluation ("zh" scores characters)
    prompts: list[str] = field(default_factory=lambda: ["<Image><ImageHere></Image> Describe the image."])
    image_size: int = 224  # the image encoder's input size
    on_bad_sample: str = choice("error", "skip")  # "error" stops at a missing field or file; "skip" drops it, counted
    max_samples: int | None = None


def prepare_storage(cfg, spec_class: type, write: Callable, kind: str) -> Path:
    """The dataset folder, with the part of the synthetic world that ``spec_class`` and ``write`` make (images,
    videos, ...) written into it first when the config asks for it; ``kind`` names its cache folder."""
    if cfg.world is None:
        if not cfg.storage:
            raise ValueError("dataset needs 'storage' (a data folder) or 'world' (generate the synthetic world)")
        return resolve_path(cfg.storage)
    try:
        spec = spec_class(**dict(cfg.world))
    except TypeError as error:
        raise ValueError(f"bad 'world' block {dict(cfg.world)}: {error}") from None
    root = resolve_path(cfg.storage) if cfg.storage else cache_dir() / "world" / f"{kind}-{spec_digest(spec)}"
    write(spec, root)
    return root


class CaptionDataset(Dataset):
    """Records with a media file and a caption (COCO-caption JSON); ``media`` names the file's field: image, video."""

    def __init__(self, records: list[dict], root: Path, processor: Callable, prompts: list[str], caption_field: str,
                 training: bool, media: str = "image") -> None:
        self.records, self.root, self.processor, self.media = records, root, processor, media
        self.prompts, self.caption_field, self.training = list(prompts), caption_field, training

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        # Training varies the instruction; evaluation always asks the first one, so scores are comparable.
        prompt = random.choice(self.prompts) if self.training else self.prompts[0]
        return {"id": str(record.get(f"{self.media}_id", index)), self.media: self.processor(self.root / record[self.media]),
                "prompt": prompt, "answer": record[self.caption_field]}


def read_json_list(path: Path, what: str) -> list:
    """The JSON list of records in ``path``; a missing file, bad JSON or another type is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(records).__name__}")
    return records


def read_caption_records(path: Path, caption_field: str, image_root: Path, on_bad_sample: str,
                         media_field: str) -> list[dict]:
    """Records of a caption JSON whose ``media_field`` names a media file; a record lacking a field or its file
    is an error naming both."""
    records = read_json_list(path, "caption annotation")
    kept, skipped = [], 0
    for index, record in enumerate(records):
        problem = None
        missing = [f for f in (media_field, caption_field) if not isinstance(record, dict) or f not in record]
        if missing:
            problem = f"record {index} in {path} lacks field {missing[0]!r}"
        elif not (image_root / record[media_field]).is_file():
            problem = f"record {index} in {path}: {media_field} file not found: {image_root / record[media_field]}"
        if problem is None:
            kept.append(record)
        elif on_bad_sample == "skip":
            skipped += 1
        else:
            raise ValueError(problem + " (set on_bad_sample: skip to drop such records)")
    if skipped:
        log.warning("skipped %d of %d records of %s (on_bad_sample: skip)", skipped, len(records), path)
    return kept


@register_builder("coco_caption")
class CocoCaptionBuilder:
    Config = CaptionBuilderConfig
    metric = "caption"
    media = "image"  # the records' field holding the media file; its folder is the config's ``<media>_root``
    world = (WorldImageSpec, write_world_images, "images")  # what a ``world`` block generates

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def records(self, split: str) -> tuple[list[dict], Path, Path]:
        """The split's checked records (not yet cut to ``max_samples``), the folder their media paths start in
        and the annotation file."""
        cfg = self.cfg
        root = prepare_storage(cfg, *self.world)
        media_root, annotations = root / getattr(cfg, f"{self.media}_root"), root / cfg.annotations.format(split=split)
        records = read_caption_records(annotations, cfg.caption_field, media_root, cfg.on_bad_sample,
                                       media_field=self.media)
        return records, media_root, annotations

    def processor(self) -> Callable:
        return ImageProcessor(self.cfg.image_size)

    def build(self, split: str) -> CaptionDataset:
        records, root, _ = self.records(split)
        return CaptionDataset(records[: self.cfg.max_samples], root, self.processor(), self.cfg.prompts,
                              self.cfg.caption_field, training=split == "train", media=self.media)


@dataclass
class ShardBuilderConfig(CaptionBuilderConfig):
    shards: str = "shards/{split}-*.tar"  # a glob relative to storage, or brace notation (``{000000..000009}``)
    image_key: str = "png;jpg;jpeg"
    caption_key: str = "txt"  # or "json" to read ``caption_field`` from the sample's JSON


class ShardDataset(IterableDataset):
    def __init__(self, urls: list[str], cfg, training: bool) -> None:
        self.urls, self.cfg, self.training = urls, cfg, training
        self.processor = ImageProcessor(cfg.image_size)

    def __iter__(self):
        cfg = self.cfg
        pipeline = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False).decode("pil")
        produced = skipped = 0
        for sample in pipeline:
            if cfg.max_samples is not None and produced >= cfg.max_samples:
                break
            try:
                image = next(sample[k] for k in cfg.image_key.split(";") if k in sample)
                answer = sample["txt"] if cfg.caption_key == "txt" else sample["json"][cfg.caption_field]
            except (StopIteration, KeyError):
                if cfg.on_bad_sample != "skip":
                    raise ValueError(f"shard sample {sample.get('__key__')} in {sample.get('__url__')} lacks "
                                     f"{cfg.image_key!r} or {cfg.caption_key!r}") from None
                skipped += 1
                continue
            prompt = random.choice(cfg.prompts) if self.training else cfg.prompts[0]
            produced += 1
            yield {"id": sample["__key__"], "image": self.processor(image), "prompt": prompt, "answer": answer}
        if skipped:
            log.warning("skipped %d shard samples lacking an image or caption (on_bad_sample: skip)", skipped)


@register_builder("webdataset_caption")
class ShardCaptionBuilder(CocoCaptionBuilder):
    Config = ShardBuilderConfig

    def build(self, split: str) -> ShardDataset:
        root = prepare_storage(self.cfg, *self.world)
        pattern = self.cfg.shards.format(split=split)
        urls = sorted(str(p) for p in root.glob(pattern)) if "*" in pattern else [str(root / pattern)]
        if not urls:
            raise FileNotFoundError(f"no shards match {root / pattern}")
        return ShardDataset(urls, self.cfg, training=split == "train")

