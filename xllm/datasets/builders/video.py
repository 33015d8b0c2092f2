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

from xllm.common.registry import registry
from xllm.datasets.builders.caption import check_on_bad_sample, prepare_storage, read_caption_records
from xllm.world.motion import motion_report
from xllm.world.videos import WorldVideoSpec, write_world_videos
from xllm.eval.caption_metrics import caption_report
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
    sampling: str = "uniform"  # uniform | fps
    fps: float | None = None
    backend: str = "pyav"  # pyav | decord
    on_short: str = "repeat"  # repeat | error
    on_bad_sample: str = "error"
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

    def report(self, references: list[str], hypotheses: list[str], lang: str) -> dict[str, float]:
        """Caption metrics, plus direction/colour/kind accuracy when the captions follow the world's motion grammar."""
        report = caption_report(references, hypotheses, lang)
        try:
            report.update(motion_report(references, hypotheses, lang))
        except ValueError:  # captions from outside the world: their motion cannot be parsed
            pass
        return report


@registry.register("builder", "video_caption")
class VideoCaptionBuilder:
    Config = VideoCaptionConfig

    def __init__(self, cfg) -> None:
        check_on_bad_sample(cfg.on_bad_sample)
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
