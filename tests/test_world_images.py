import json
import random

import webdataset as wds

from xllm.world.images import WorldImageSpec, generate_records, write_world_images
from xllm.world.scenes import Scene, caption_en, caption_zh, parse_caption, sample_scene


def test_captions_parse_back_to_their_scene():
    rng = random.Random(3)
    for _ in range(200):
        scene = sample_scene(rng)
        assert parse_caption(caption_en(scene), "en") == list(scene.shapes)
        assert parse_caption(caption_zh(scene), "zh") == list(scene.shapes)


def test_caption_golden():
    scene = Scene.from_dict({"shapes": [
        {"kind": "circle", "colour": "red", "size": "large", "position": "top left"},
        {"kind": "star", "colour": "blue", "size": "small", "position": "center"}]})
    assert caption_en(scene) == "a large red circle at the top left and a small blue star in the center."
    assert caption_zh(scene) == "左上角有一个大的红色圆形，中间有一个小的蓝色星形。"


def test_records_are_deterministic_and_splits_disjoint():
    spec = WorldImageSpec(seed=5, num_train=300, num_val=50, num_test=50)
    first, second = generate_records(spec), generate_records(spec)
    assert first == second
    scenes = {split: {json.dumps(r["scene"], sort_keys=True) for r in rows} for split, rows in first.items()}
    assert not scenes["train"] & scenes["test"] and not scenes["train"] & scenes["val"]
    assert generate_records(WorldImageSpec(seed=6, num_train=300, num_val=50, num_test=50)) != first


def test_written_json_and_shards_hold_the_same_samples(tmp_path):
    spec = WorldImageSpec(seed=1, num_train=12, num_val=4, num_test=4, image_size=32, shard_size=5)
    write_world_images(spec, tmp_path)
    records = json.loads((tmp_path / "annotations" / "train.json").read_text())
    assert len(records) == 12 and all((tmp_path / r["image"]).is_file() for r in records)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("train-*.tar"))
    assert len(shards) == 3
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [r["image_id"] for r in records]
    assert [s["txt"] for s in samples] == [r["caption"] for r in records]
    assert samples[0]["png"].size == (32, 32)
    # rendering is deterministic: a second write into another folder gives identical files
    write_world_images(spec, tmp_path / "again")
    assert (tmp_path / records[0]["image"]).read_bytes() == (tmp_path / "again" / records[0]["image"]).read_bytes()
