"""Image-text datasets: COCO-caption style JSON with image files, and webdataset shards.

Both yield ``{"id", "image", "prompt", "answer"}`` samples; the prompt places the image with a media span and
the answer is the caption. With ``world`` set, the synthetic world is written into ``storage`` first (once).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import webdataset as wds
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from xllm.common import dist
from xllm.common.config import choice, path_field
from xllm.common.paths import cache_dir, read_utf8, resolve_path, spec_digest
from xllm.datasets.guard import note_dropped
from xllm.datasets.lengths import text_length
from xllm.datasets.registry import register_builder
from xllm.world.images import WorldImageSpec, write_world_images
from xllm.processors.image import ImageProcessor

log = logging.getLogger(__name__)
DECODE = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])


@dataclass
class CaptionBuilderConfig:
    storage: str = path_field("folder", made_by="world", default="")  # the data folder; empty with ``world`` set: a cache folder named by the world's spec
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

    @property
    def modality(self) -> str:
        return self.media

    def lengths(self) -> list[float]:
        """Text units per record (``xllm.datasets.lengths``): its caption and the prompts' mean, which a
        training sample draws from; the medium is of one size."""
        prompt = sum(map(text_length, self.prompts)) / len(self.prompts)
        return [prompt + text_length(record[self.caption_field]) for record in self.records]

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
        records = json.loads(read_utf8(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(records).__name__}")
    return records


def not_text(value: Any) -> bool:
    """Whether an annotation's text field fails to hold text: not a string, or only white space."""
    return not isinstance(value, str) or not value.strip()


def read_caption_records(path: Path, caption_field: str, image_root: Path, on_bad_sample: str,
                         media_field: str) -> tuple[list[dict], list[dict]]:
    """Records of a caption JSON whose ``media_field`` names a media file, and those dropped (``on_bad_sample:
    skip``) as ``{"record": index in the file, "error": why}``; otherwise a record lacking a field or its file is
    an error naming both."""
    records = read_json_list(path, "caption annotation")
    kept, dropped = [], []
    for index, record in enumerate(records):
        problem = None
        missing = [f for f in (media_field, caption_field) if not isinstance(record, dict) or f not in record]
        if missing:
            problem = f"record {index} in {path} lacks field {missing[0]!r}"
        elif not_text(record[caption_field]):
            problem = (f"record {index} in {path}: field {caption_field!r} must be a non-empty string, got "
                       f"{record[caption_field]!r}"[:300])
        elif not isinstance(record[media_field], str):
            problem = f"record {index} in {path}: field {media_field!r} must be a file name, got {record[media_field]!r}"
        elif not (image_root / record[media_field]).is_file():
            problem = f"record {index} in {path}: {media_field} file not found: {image_root / record[media_field]}"
        if problem is None:
            kept.append(record)
        elif on_bad_sample == "skip":
            dropped.append({"record": index, "error": problem})
        else:
            raise ValueError(problem + " (set on_bad_sample: skip to drop such records)")
    log_dropped(dropped, len(records), path)
    return kept, dropped


def log_dropped(dropped: list[dict], total: int, path: Path, shown: int = 10) -> None:
    """Each dropped record's reason (the first ``shown`` of them) and their count."""
    for problem in dropped[:shown]:
        log.warning("skipped %s", problem["error"])
    if dropped:
        log.warning("skipped %d of %d records of %s (on_bad_sample: skip)", len(dropped), total, path)


@register_builder("coco_caption")
class CocoCaptionBuilder:
    Config = CaptionBuilderConfig
    metric = "caption"
    media = "image"  # the records' field holding the media file; its folder is the config's ``<media>_root``
    world = (WorldImageSpec, write_world_images, "images")  # what a ``world`` block generates

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def records(self, split: str) -> tuple[list[dict], Path, Path, list[dict]]:
        """The split's checked records (not yet cut to ``max_samples``), the folder their media paths start in,
        the annotation file, and the records dropped as unreadable (``read_caption_records``)."""
        cfg = self.cfg
        root = prepare_storage(cfg, *self.world)
        media_root, annotations = root / getattr(cfg, f"{self.media}_root"), root / cfg.annotations.format(split=split)
        records, dropped = read_caption_records(annotations, cfg.caption_field, media_root, cfg.on_bad_sample,
                                                media_field=self.media)
        return records, media_root, annotations, dropped

    def processor(self) -> Callable:
        return ImageProcessor(self.cfg.image_size)

    def build(self, split: str) -> CaptionDataset:
        records, root, _, dropped = self.records(split)
        dataset = CaptionDataset(records[: self.cfg.max_samples], root, self.processor(), self.cfg.prompts,
                                 self.cfg.caption_field, training=split == "train", media=self.media)
        return note_dropped(dataset, dropped, len(records) + len(dropped))


@dataclass
class ShardBuilderConfig(CaptionBuilderConfig):
    shards: str = "shards/{split}-*.tar"  # a glob relative to storage, or brace notation (``{000000..000009}``)
    image_key: str = "png;jpg;jpeg"
    caption_key: str = "txt"  # or "json" to read ``caption_field`` from the sample's JSON
    shuffle_buffer: int = 1000  # training samples shuffled in a seeded buffer of this size; 0 or 1 keeps order
    seed: int = 0  # the training order: shard order per epoch and the shuffle buffer


class ShardDataset(IterableDataset):
    """Samples from webdataset shards: in shard order for evaluation; for training, an endless stream.

    Training: each epoch deals the shards, in an order drawn from (seed, epoch), to the ranks in turn, shuffles
    each rank's samples in a seeded buffer and moves on to the next epoch, so every rank always has a next batch
    (the run's length is ``run.max_steps``). The stream batches itself (``batch_size``): batch ``k`` of a rank
    is decoded by DataLoader worker ``k % workers``, which the DataLoader returns in turn, so the order is the
    same whatever the number of workers, and ``set_position`` skips the samples a resumed run has seen without
    decoding them. ``max_samples`` caps each rank's epoch at ``max_samples // world size`` samples.
    """

    def __init__(self, urls: list[str], cfg, training: bool) -> None:
        self.urls, self.cfg, self.training = urls, cfg, training
        self.processor = ImageProcessor(cfg.image_size)
        self.batch_size: int | None = None  # set by the training loader: the stream yields lists of samples
        self.epoch = self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """``start`` samples seen by all ranks together (the stream's epochs run on inside it)."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if not self.training or self.batch_size is None:
            yield from self._evaluation_samples()
            return
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        skip = self.start // dist.world_size()
        batch, index, epoch = [], 0, self.epoch
        while True:
            seen = 0
            for raw in self._epoch(epoch):
                seen += 1
                if skip:
                    skip -= 1
                    continue
                batch.append(raw)
                if len(batch) == self.batch_size:
                    if index % workers == worker_id:
                        yield self._decoded_batch(batch)
                    batch, index = [], index + 1
            if seen == 0:
                raise ValueError(f"rank {dist.rank()} got no training sample from its shards {self.urls}")
            epoch += 1

    def _epoch(self, epoch: int):
        """This rank's raw (undecoded) samples of one epoch."""
        shards = list(self.urls)
        random.Random(f"{self.cfg.seed}-{epoch}").shuffle(shards)
        if len(shards) < dist.world_size():
            raise ValueError(f"{len(shards)} shards cannot be dealt to {dist.world_size()} processes: write at least "
                             f"as many shards as processes ({self.urls[0]} ...)")
        stages = [wds.SimpleShardList(shards[dist.rank():: dist.world_size()]), wds.tarfile_to_samples()]
        if self.cfg.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
                                      seed=f"{self.cfg.seed}-{epoch}-{dist.rank()}"))
        cap = None if self.cfg.max_samples is None else self.cfg.max_samples // dist.world_size()
        return itertools.islice(wds.DataPipeline(*stages), cap)

    def _decoded_batch(self, raws: list[dict]) -> list[dict]:
        samples = [s for s in map(self._sample, raws) if s is not None]
        if not samples:
            raise ValueError(f"every sample of a batch was bad ({', '.join(r['__key__'] for r in raws[:4])} ... in "
                             f"{raws[0].get('__url__')})")
        return samples

    def _evaluation_samples(self):
        pipeline = wds.DataPipeline(wds.SimpleShardList(self.urls), wds.tarfile_to_samples())
        samples = filter(None, map(self._sample, pipeline))
        yield from itertools.islice(samples, self.cfg.max_samples)

    def _sample(self, raw: dict) -> dict | None:
        """The decoded sample, or None for a bad one with ``on_bad_sample: skip`` (logged)."""
        cfg = self.cfg
        where = f"shard sample {raw.get('__key__')} in {raw.get('__url__')}"
        try:
            sample = DECODE(raw)
            image = next(sample[k] for k in cfg.image_key.split(";") if k in sample)
            answer = sample["txt"] if cfg.caption_key == "txt" else sample["json"][cfg.caption_field]
            pixels = self.processor(image)
        except (StopIteration, KeyError):
            problem = f"{where} lacks {cfg.image_key!r} or {cfg.caption_key!r}"
        except (wds.autodecode.DecodingError, OSError, ValueError) as error:
            problem = f"{where} cannot be decoded ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        else:
            prompt = random.choice(cfg.prompts) if self.training else cfg.prompts[0]
            return {"id": sample["__key__"], "image": pixels, "prompt": prompt, "answer": answer}
        if cfg.on_bad_sample != "skip":
            raise ValueError(problem) from None
        log.warning("skipped %s (on_bad_sample: skip)", problem)
        return None


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

