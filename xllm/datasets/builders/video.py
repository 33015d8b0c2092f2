"""Video-caption datasets: a caption JSON of ``{"video", "caption", ...}`` records with video files.

Samples are ``{"id", "video", "prompt", "answer"}`` with ``video`` a [frames, 3, size, size] tensor. With
``world`` set, the synthetic world's motion clips are written into ``storage`` (or the cache) first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xllm.datasets.registry import register_builder
from xllm.common.config import choice, path_field
from xllm.datasets.builders.caption import CocoCaptionBuilder
from xllm.world.videos import WorldVideoSpec, write_world_videos
from xllm.processors.video import VideoProcessor


@dataclass
class VideoCaptionConfig:
    storage: str = path_field("folder", made_by="world", default="")
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


@register_builder("video_caption")
class VideoCaptionBuilder(CocoCaptionBuilder):
    Config = VideoCaptionConfig
    metric = "motion"
    media = "video"
    world = (WorldVideoSpec, write_world_videos, "videos")

    def processor(self) -> VideoProcessor:
        cfg = self.cfg
        return VideoProcessor(cfg.image_size, cfg.num_frames, cfg.sampling, cfg.fps, cfg.backend, cfg.on_short)
