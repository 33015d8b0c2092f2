import dataclasses
import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from xllm.common.config import ConfigError
from xllm.datasets.config import resolve_datasets
from xllm.datasets.registry import BUILDERS
from xllm.datasets.build import build_split
from xllm.processors.collator import Collator
from xllm.processors.image import ImageProcessor


def folder_with(tmp_path, records: list[dict]):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(records))
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def build(tmp_path, **options):
    cfg = resolve_datasets(OmegaConf.create({"d": {"builder": "coco_caption", "storage": str(tmp_path),
                                                   "image_size": 16, **options}}))
    return build_split(cfg, "train")["d"]


def test_a_record_without_a_caption_names_file_index_and_field(tmp_path):
    folder_with(tmp_path, [{"image": "ok.png", "caption": "a"}, {"image": "ok.png"}])
    with pytest.raises(ValueError, match=r"record 1 in .*train\.json lacks field 'caption'"):
        build(tmp_path)


def test_a_missing_image_file_is_named(tmp_path):
    folder_with(tmp_path, [{"image": "gone.png", "caption": "a"}])
    with pytest.raises(ValueError, match=r"image file not found: .*gone\.png"):
        build(tmp_path)


def test_an_unreadable_image_is_named_when_read(tmp_path):
    dataset = build(folder_with(tmp_path, [{"image": "broken.png", "caption": "a"}]))
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        dataset[0]


def test_skipping_is_opt_in_and_counted(tmp_path, caplog):
    folder_with(tmp_path, [{"image": "ok.png", "caption": "a"}, {"image": "gone.png", "caption": "b"}, {"caption": "c"}])
    with caplog.at_level(logging.WARNING):
        dataset = build(tmp_path, on_bad_sample="skip")
    assert len(dataset) == 1 and "skipped 2 of 3 records" in caplog.text


def test_samples_and_batches(tmp_path):
    dataset = build(folder_with(tmp_path, [{"image": "ok.png", "caption": "a red thing", "image_id": 7}] * 3),
                    prompts=["<Image><ImageHere></Image> Say."])
    sample = dataset[0]
    assert sample["image"].shape == (3, 16, 16) and sample["answer"] == "a red thing" and sample["id"] == "7"
    assert [dataset[i]["prompt"] for i in range(2)] == ["<Image><ImageHere></Image> Say."] * 2
    batch = Collator(["image"])([dataset[0], dataset[1]])
    assert batch.media["image"].shape == (2, 3, 16, 16) and batch.ids == ["7", "7"]


def test_image_processor_normalises_like_clip():
    pixels = ImageProcessor(4)(Image.new("RGB", (4, 4), (255, 0, 0)))
    expected_red = (1.0 - 0.48145466) / 0.26862954
    assert torch.allclose(pixels[0], torch.full((4, 4), expected_red))


def test_webdataset_builder_reads_the_same_world(micro_world):
    cfg = {"builder": "webdataset_caption", **micro_world}
    shards = build_split(resolve_datasets(OmegaConf.create({"s": cfg})), "test")["s"]
    coco = build_split(resolve_datasets(OmegaConf.create({"c": {**cfg, "builder": "coco_caption"}})), "test")["c"]
    from_shards = list(shards)
    assert [s["answer"] for s in from_shards] == [coco[i]["answer"] for i in range(len(coco))]
    assert torch.allclose(from_shards[0]["image"], coco[0]["image"])


@pytest.mark.parametrize("name", ["coco_caption", "webdataset_caption", "video_caption", "world_qa"])
def test_an_unknown_on_bad_sample_is_refused_when_the_config_loads(name):
    assert "on_bad_sample" in {f.name for f in dataclasses.fields(BUILDERS.get(name).Config)}
    with pytest.raises(ConfigError, match="datasets.d.on_bad_sample' must be one of 'error', 'skip', got 'skipp'"):
        resolve_datasets(OmegaConf.create({"d": {"builder": name, "on_bad_sample": "skipp"}}))
