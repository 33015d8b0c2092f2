"""Writes the world's motion clips as real H.264 mp4 files with caption JSON per split.

``annotations/{split}.json`` lists ``{"video", "caption", "caption_zh", "video_id", "motion"}`` records and the
files live under ``videos/{split}/``. Test clips never repeat a training clip's motion. Frames are drawn with
``render.py``'s shapes; the moving shape slides from its start cell's centre to its end cell's centre.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from xllm.world.splits import SPLITS, unique_draws, write_splits
from xllm.world.motion import Motion, motion_caption_en, motion_caption_zh, sample_motion
from xllm.world.render import RENDER_VERSION, cell_center, draw_shape


@dataclass(frozen=True)
class WorldVideoSpec:
    seed: int = 0
    num_train: int = 2000
    num_val: int = 100
    num_test: int = 200
    image_size: int = 64  # even: H.264's 4:2:0 chroma needs even sides
    num_frames: int = 8
    fps: int = 8
    max_still: int = 1
    render_version: int = RENDER_VERSION


def generate_records(spec: WorldVideoSpec) -> dict[str, list[dict]]:
    """Motions and captions per split (no pixels); no motion appears in two splits."""
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for split, index, motion, rng in unique_draws(spec, f"video/{spec.seed}/",
                                                  lambda rng: sample_motion(rng, spec.max_still)):
        video_id = f"{split}_{index:06d}"
        records[split].append({"video": f"videos/{split}/{video_id}.mp4", "caption": motion_caption_en(motion),
                               "caption_zh": motion_caption_zh(motion), "video_id": video_id,
                               "motion": motion.to_dict(), "render_seed": rng.randrange(2**31)})
    return records


def render_frames(motion: Motion, size: int, num_frames: int, rng: random.Random) -> list[Image.Image]:
    shade = rng.randint(25, 60)
    cell = size / 3
    colour_seed = rng.randrange(2**31)  # one colour jitter per clip: a shape keeps its colour while it moves
    (x0, y0), (x1, y1) = cell_center(motion.mover.position, size), cell_center(motion.end, size)
    frames = []
    for index in range(num_frames):
        progress = index / max(num_frames - 1, 1)
        image = Image.new("RGB", (size, size), (shade, shade, shade))
        draw = ImageDraw.Draw(image)
        colours = random.Random(colour_seed)
        for shape in motion.still:
            draw_shape(draw, shape, *cell_center(shape.position, size), cell, colours)
        draw_shape(draw, motion.mover, x0 + (x1 - x0) * progress, y0 + (y1 - y0) * progress, cell, colours)
        frames.append(image)
    return frames


def write_mp4(frames: list[Image.Image], path: Path, fps: int) -> None:
    """H.264 (libx264, yuv420p) at near-lossless quality, so the shapes' colours survive the encoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "veryfast"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_world_videos(spec: WorldVideoSpec, root: Path) -> None:
    """Renders and encodes every split under ``root`` (see ``write_splits``)."""
    if spec.image_size % 2:
        raise ValueError(f"world video image_size must be even for H.264, got {spec.image_size}")

    def write_files(root: Path, split: str, rows: list[dict]) -> None:
        for row in rows:
            frames = render_frames(Motion.from_dict(row["motion"]), spec.image_size, spec.num_frames,
                                   random.Random(row["render_seed"]))
            write_mp4(frames, root / row["video"], spec.fps)

    write_splits(spec, root, "videos", generate_records, write_files, ensure_ascii=False, indent=0)
