"""Video preprocessing: decode a file, sample N frames, and prepare each frame as ``ImageProcessor`` does.

Decoding uses PyAV by default; ``backend: decord`` uses decord when it is installed and asked for (it seeks
faster in long files). Sampling is ``uniform`` (N frames spread evenly over the whole clip, each the middle of
its stretch) or ``fps`` (one frame every 1/fps seconds from the start). A clip with fewer frames than asked
for is padded by repeating its last frame (``on_short: repeat``, the default: short clips stay usable) or
refused (``on_short: error``). A missing file, a file with no video stream, an undecodable (corrupt) file and
a codec the decoder lacks are errors that name the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from xllm.common.config import choice
from xllm.processors.registry import register_processor
from xllm.processors.image import CLIP_MEAN, CLIP_STD, ImageProcessor


class VideoError(ValueError):
    """A video file that cannot give the frames asked for; the message names the file."""


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread over ``total`` frames: the middle frame of each of ``count`` equal stretches
    (every frame of a shorter video)."""
    if total < count:
        return list(range(total))
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def fps_indices(timestamps: list[float], fps: float, count: int) -> list[int]:
    """Indices of the first frame at or after each time 0, 1/fps, 2/fps, ... (at most ``count`` of them)."""
    if fps <= 0:
        raise ValueError(f"sampling fps must be positive, got {fps}")
    start = timestamps[0] if timestamps else 0.0
    chosen, target = [], start
    for index, time in enumerate(timestamps):
        if len(chosen) == count:
            break
        if time + 1e-6 >= target:
            chosen.append(index)
            target += 1.0 / fps
    return chosen


def _read_pyav(path: Path, count: int, sampling: str, fps: float | None) -> list[Image.Image]:
    """Decodes every frame of the first video stream, with its presentation time in seconds, and samples them."""
    import av

    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"video file not found: {path}") from None
    except av.FFmpegError as error:
        raise VideoError(f"cannot open video file {path} (corrupt or not a video container): {error}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(f"video file {path} has no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        if stream.codec_context is None or stream.codec_context.codec is None:
            raise VideoError(f"video file {path}: no decoder for its video codec")
        frames, times = [], []
        try:
            for frame in container.decode(stream):
                frames.append(frame)
                times.append(float(frame.time) if frame.time is not None else len(times) / float(stream.average_rate or 1))
        except av.FFmpegError as error:
            if not frames:
                raise VideoError(f"cannot decode video file {path} (codec {stream.codec_context.name!r}): "
                                 f"{error}") from None
            # A damaged tail still leaves the frames before it; the short-clip rule decides what happens next.
    if not frames:
        raise VideoError(f"video file {path} holds no decodable frame (codec {stream.codec_context.name!r})")
    indices = fps_indices(times, fps, count) if sampling == "fps" else uniform_indices(len(frames), count)
    return [frames[i].to_image() for i in indices]


def _read_decord(path: Path, count: int, sampling: str, fps: float | None) -> list[Image.Image]:
    try:
        import decord
    except ImportError:
        raise ImportError("video backend 'decord' was asked for but decord is not installed "
                          "(pip install decord, or use backend: pyav)") from None
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        reader = decord.VideoReader(str(path))
    except (decord.DECORDError, RuntimeError) as error:  # a file FFmpeg cannot parse raises a bare RuntimeError
        reason = "no video stream" if "cannot find video stream" in str(error) else str(error).splitlines()[0]
        raise VideoError(f"cannot open video file {path} with decord: {reason}") from None
    if sampling == "uniform":
        indices = uniform_indices(len(reader), count)
    else:
        rate = reader.get_avg_fps()
        indices = fps_indices([i / rate for i in range(len(reader))], fps, count)
    return [Image.fromarray(array) for array in reader.get_batch(indices).asnumpy()]


def read_frames(path: str | Path, num_frames: int, sampling: str = "uniform", fps: float | None = None,
                backend: str = "pyav", on_short: str = "repeat") -> list[Image.Image]:
    """``num_frames`` RGB frames of a video file, sampled and padded as described in the module docstring."""
    # sampling, backend and on_short are checked where the config loads (their fields' choices)
    if sampling == "fps" and not fps:
        raise ValueError("video sampling 'fps' needs a positive 'fps'")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    path = Path(path)
    frames = (_read_pyav if backend == "pyav" else _read_decord)(path, num_frames, sampling, fps)
    if len(frames) >= num_frames:
        return frames
    if not frames:
        raise VideoError(f"video file {path} holds no decodable frame")
    if on_short == "error":
        raise VideoError(f"video file {path} gives {len(frames)} frame(s) but {num_frames} were asked for "
                         "(on_short: repeat pads with the last frame)")
    return frames + [frames[-1]] * (num_frames - len(frames))


@register_processor("video")
class VideoProcessor:
    @dataclass
    class Config:
        image_size: int = 224
        num_frames: int = 8
        sampling: str = choice("uniform", "fps")
        fps: float | None = None  # frames per second read when sampling is "fps"
        backend: str = choice("pyav", "decord")  # decord: an optional dependency
        on_short: str = choice("repeat", "error")  # repeat: pad with the last frame
        mean: list[float] | None = None
        std: list[float] | None = None

    def __init__(self, image_size: int, num_frames: int, sampling: str = "uniform", fps: float | None = None,
                 backend: str = "pyav", on_short: str = "repeat", mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.frame = ImageProcessor(image_size, mean, std)
        self.num_frames, self.sampling, self.fps, self.backend, self.on_short = num_frames, sampling, fps, backend, on_short

    def settings(self) -> dict:
        """What the frames depend on (a feature cache records it)."""
        return {**self.frame.settings(), "num_frames": self.num_frames, "sampling": self.sampling, "fps": self.fps,
                "backend": self.backend, "on_short": self.on_short}

    def __call__(self, path: str | Path) -> torch.Tensor:
        """A [num_frames, 3, size, size] float tensor."""
        frames = read_frames(path, self.num_frames, self.sampling, self.fps, self.backend, self.on_short)
        return torch.stack([self.frame(frame) for frame in frames])
