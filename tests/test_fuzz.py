"""Fuzzing every reader with hundreds of broken files: each gives a finite result of the right shape or an error
(ValueError or OSError) that names the file, never another exception, a hang or a crash."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from xllm.datasets.builders.caption import read_caption_records
from xllm.processors.audio import AudioProcessor
from xllm.processors.feature_cache import CachedSplit, EncodedMedium, ShardWriter
from xllm.processors.image import ImageProcessor
from xllm.processors.video import VideoProcessor
from xllm.world.videos import write_mp4

MUTATIONS = ("truncate", "flip", "header", "empty", "one_byte", "zeros", "repeat")


def mutate(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "truncate":
        return data[: rng.randrange(1, max(len(data), 2))]
    if how == "flip":
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if how == "header":
        return bytes(rng.randrange(256) for _ in range(16)) + data[16:]
    if how == "empty":
        return b""
    if how == "one_byte":
        return data[:1]
    if how == "zeros":
        return bytes(len(data))
    return data[: len(data) // 2] * 3  # a file whose middle repeats


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    Image.fromarray(pixels).save(folder / "image.jpg", quality=90)
    tone = (0.3 * np.sin(np.arange(8000) * 0.05)).astype(np.float32)
    sf.write(folder / "speech.wav", tone, 16000)
    sf.write(folder / "speech.flac", tone, 16000)
    write_mp4([Image.fromarray(np.roll(pixels, k, axis=1)) for k in range(6)], folder / "clip.mp4", fps=6)
    (folder / "ann.json").write_text(json.dumps([{"image": "image.png", "caption": "a red circle."}] * 3))
    shard = ShardWriter(folder, "features", max_bytes=1 << 20)
    features = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32))
    shard.add(EncodedMedium(features, torch.ones(5, dtype=torch.bool)))
    shard.close()
    return {p.suffix + ("_" + p.stem if p.suffix == ".json" else ""): p for p in folder.iterdir()}


def read_cached_row(path: Path) -> EncodedMedium:
    """Row 0 of a feature-cache shard, read as training reads it (the CRC-32 checked)."""
    return CachedSplit(path.parent, "fuzz", {"shards": [path.name], "samples": {}, "unreadable": {}}).read(0, 0)


def readers(folder: Path):
    image, audio, video = ImageProcessor(16), AudioProcessor(), VideoProcessor(image_size=16, num_frames=4)
    return {
        "features": (read_cached_row, lambda out: out.features.shape == (5, 8) and out.mask.shape == (5,)),
        "image": (image, lambda out: out.shape == (3, 16, 16)),
        "audio": (audio, lambda out: out.ndim == 2 and out.shape[0] == 80),
        "video": (video, lambda out: out.shape == (4, 3, 16, 16)),
        "annotations": (lambda path: read_caption_records(path, "caption", folder, "skip", media_field="image")[0],
                        lambda out: isinstance(out, list)),
    }


KIND_OF = {".png": "image", ".jpg": "image", ".wav": "audio", ".flac": "audio", ".mp4": "video",
           ".json_ann": "annotations", ".safetensors": "features"}


def test_two_hundred_and_more_broken_files_through_every_reader(good_files, tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "image.png").write_bytes(good_files[".png"].read_bytes())  # what the annotations point at
    cases = []
    for suffix, good in good_files.items():
        data = good.read_bytes()
        for how in MUTATIONS:
            for copy in range(6):
                path = folder / f"{good.stem}-{how}-{copy}{good.suffix}"
                path.write_bytes(mutate(data, how, rng))
                cases.append((KIND_OF[suffix], path))
        # The right bytes under the wrong name, and another kind's bytes under this name.
        for other_suffix, other in good_files.items():
            if KIND_OF[other_suffix] != KIND_OF[suffix]:
                path = folder / f"{good.stem}-as-{other.stem}{other_suffix.split('_')[0]}{good.suffix}"
                path.write_bytes(other.read_bytes())
                cases.append((KIND_OF[suffix], path))
    nan_wav = folder / "nan.wav"
    sf.write(nan_wav, np.full(4000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    cases.append(("audio", nan_wav))
    assert len(cases) >= 200
    outcomes = {"read": 0, "refused": 0}
    for kind, path in cases:
        read, valid = readers(folder)[kind]
        try:
            out = read(path)
        except (ValueError, OSError) as error:
            assert path.name in str(error) or str(path) in str(error), f"{kind} {path.name}: {error}"
            outcomes["refused"] += 1
            continue
        assert valid(out), f"{kind} {path.name}: read as {getattr(out, 'shape', type(out))}"
        if isinstance(out, EncodedMedium):
            out = out.features
        if isinstance(out, torch.Tensor):
            assert torch.isfinite(out).all(), f"{kind} {path.name}: non-finite values read"
        outcomes["read"] += 1
    assert outcomes["refused"] >= 150, outcomes


def test_a_broken_webdataset_shard_is_refused_or_skipped_by_name(tmp_path, micro_world):
    from omegaconf import OmegaConf

    from xllm.datasets.build import build_split
    from xllm.datasets.config import resolve_datasets

    source = build_split(resolve_datasets(OmegaConf.create({"s": {"builder": "webdataset_caption", **micro_world}})),
                         "test")["s"].urls[0]
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken = tmp_path / "shards"
    broken.mkdir()
    pngs = 0
    with tarfile.open(broken / "test-000000.tar", "w") as tar:
        for member, data in members:
            if member.name.endswith(".png"):
                pngs += 1
                if pngs % 3 == 1:  # every third image cut in half
                    data = data[: len(data) // 2]
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    cfg = {"builder": "webdataset_caption", "storage": str(tmp_path), "image_size": 32, "on_bad_sample": "skip"}
    dataset = build_split(resolve_datasets(OmegaConf.create({"s": cfg})), "test")["s"]
    with pytest.raises(ValueError, match=r"shard sample \S+ in \S+test-000000.tar cannot be decoded"):
        strict = build_split(resolve_datasets(OmegaConf.create({"s": {**cfg, "on_bad_sample": "error"}})), "test")["s"]
        list(strict)
    assert len(list(dataset)) == pngs - (pngs + 2) // 3  # the whole ones, the cut ones skipped
