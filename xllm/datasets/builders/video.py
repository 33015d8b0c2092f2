"""Video-caption datasets: a caption JSON of ``{"video", "caption", ...}`` records with video files.

Samples are ``{"id", "video", "prompt", "answer"}`` with ``video`` a [frames, 3, size, size] tensor. With
``world`` set, the synthetic world's motion clips are written into ``storage`` (or the cache) first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from xllm.datasets.registry import register_builder
from xllm.common.config import choice
from xllm.datasets.builders.caption import prepare_storage, read_caption_records
from xllm.world.videos import WorldVideoSpec, write_world_videos
from xllm.processors.video import VideoProcessor


@dataclass
class VideoCaptionConfig:
    storage: str = ""
    world: dict[str, Any] | None = None  # WorldVideoSpec fields: generate the world's motion clips
    annotations: str = "annotations/{split}.json"
    video_root: str = ""
    caption_field: str = "caption"
    lang: str = "en"
    prompts: list[str] = field(default_factory=lambda: ["<Video><VideoHere></Video> Describe the video."])
    image_size: int = 224
    num_frames: int = 8
    sampling: str = choice("uniform", "fps")
    fps: float | None = None
    backend: str = choice("pyav", "decord")
    on_short: str = choice("repeat", "error")
    on_bad_sample: str = choice("error", "skip")
    max_samples: int | None = None


class VideoCaptionDataset(Dataset):
    def __init__(self, records: list[dict], root: Path, processor: VideoProcessor, cfg, training: bool) -> None:
        self.records, self.root, self.processor, self.cfg, self.training = records, root, processor, cfg, training

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        prompt = random.choice(self.cfg.prompts) if self.training else self.cfg.prompts[0]
        return {"id": str(record.get("video_id", index)), "video": self.processor(self.root / record["video"]),
                "prompt": prompt, "answer": record[self.cfg.caption_field]}


@register_builder("video_caption")
class VideoCaptionBuilder:
    Config = VideoCaptionConfig
    metric = "motion"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def build(self, split: str) -> VideoCaptionDataset:
        cfg = self.cfg
        root = prepare_storage(cfg, WorldVideoSpec, write_world_videos, kind="videos")
        video_root = root / cfg.video_root
        records = read_caption_records(root / cfg.annotations.format(split=split), cfg.caption_field, video_root,
                                       cfg.on_bad_sample, media_field="video")
        if cfg.max_samples is not None:
            records = records[: cfg.max_samples]
        processor = VideoProcessor(cfg.image_size, cfg.num_frames, cfg.sampling, cfg.fps, cfg.backend, cfg.on_short)
        return VideoCaptionDataset(records, video_root, processor, cfg, training=split == "train")
