import dataclasses
import itertools
import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from xllm.common import dist
from xllm.common.config import ConfigError
from xllm.datasets.config import resolve_datasets
from xllm.datasets.registry import BUILDERS
from xllm.datasets.build import build_split
from xllm.datasets.lengths import text_length
from xllm.datasets.loader import training_loader
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


@pytest.mark.parametrize("name", ["coco_caption", "webdataset_caption", "video_caption", "world_qa",
                                  "llava_conversation"])
def test_an_unknown_on_bad_sample_is_refused_when_the_config_loads(name):
    assert "on_bad_sample" in {f.name for f in dataclasses.fields(BUILDERS.get(name).Config)}
    with pytest.raises(ConfigError, match="datasets.d.on_bad_sample' must be one of 'error', 'skip', got 'skipp'"):
        resolve_datasets(OmegaConf.create({"d": {"builder": name, "on_bad_sample": "skipp"}}))


def stream_ids(dataset, batch_size: int, workers: int, start: int = 0, batches: int = 7) -> list[list[str]]:
    dataset.set_position(0, start)
    loader = training_loader(dataset, lambda samples: [s["id"] for s in samples], batch_size, seed=0,
                             num_workers=workers)
    return list(itertools.islice(iter(loader), batches))


def test_a_training_stream_is_dealt_by_rank_shuffled_and_resumable(micro_world, monkeypatch):
    cfg = resolve_datasets(OmegaConf.create({"s": {"builder": "webdataset_caption", **micro_world,
                                                   "shuffle_buffer": 6}}))

    def stream(rank: int = 0, world: int = 1):
        monkeypatch.setattr(dist, "rank", lambda: rank)
        monkeypatch.setattr(dist, "world_size", lambda: world)
        return build_split(cfg, "train")["s"]

    alone = stream_ids(stream(), 4, workers=0)
    # Endless: 7 batches of 4 run past the 24 samples into a second epoch, in a new order.
    first_epoch = [i for batch in alone for i in batch][:24]
    assert len(set(first_epoch)) == 24 and [i for batch in alone for i in batch][24:] != first_epoch[:4]
    assert first_epoch != sorted(first_epoch)  # shuffled
    assert stream_ids(stream(), 4, workers=2) == alone  # the same order whatever the number of workers
    assert stream_ids(stream(), 4, workers=0, start=12, batches=4) == alone[3:]  # resumed after 3 batches
    ranks = [stream_ids(stream(rank, 2), 2, workers=0, batches=3) for rank in (0, 1)]
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}  # shards dealt, no overlap
    with pytest.raises(ValueError, match="3 shards cannot be dealt to 4 processes"):
        stream_ids(stream(0, 4), 2, workers=0)
    with pytest.raises(ValueError, match="run.group_by_length needs map-style training data"):
        training_loader(stream(), lambda samples: samples, 4, seed=0, group_by_length=True)


@pytest.mark.parametrize("caption", [None, "", "   ", 7, ["a"]])
def test_a_caption_that_is_not_text_is_named_or_skipped(tmp_path, caption):
    folder_with(tmp_path, [{"image": "ok.png", "caption": "a"}, {"image": "ok.png", "caption": caption}])
    with pytest.raises(ValueError, match=r"record 1 in .*train\.json: field 'caption' must be a non-empty string"):
        build(tmp_path)
    assert len(build(tmp_path, on_bad_sample="skip")) == 1


def test_an_annotation_file_that_is_not_utf8_is_named(tmp_path):
    folder_with(tmp_path, [])
    (tmp_path / "annotations" / "train.json").write_bytes('[{"image": "ok.png", "caption": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.json is not UTF-8 text"):
        build(tmp_path)


@pytest.mark.parametrize("pairs", [None, "q?", [["q?"]], [["q?", 3]], [["q?", ""]]])
def test_world_qa_pairs_of_the_wrong_type_are_named(tmp_path, pairs):
    folder_with(tmp_path, [{"image": "ok.png", "caption": "a", "scene": {"shapes": []}, "qa": pairs, "image_id": 0}])
    with pytest.raises(ValueError, match=r"record 0 in .*train\.json: field 'qa' must be a list of \[question, "
                                         r"answer\] pairs of non-empty strings"):
        build(tmp_path, builder="world_qa")


def test_text_length_counts_words_and_each_cjk_character():
    assert text_length("A red circle, top-left.") == 4
    assert text_length("图片里有几个图形？") == 9 and text_length("两个。 two shapes") == 5
    assert text_length("  ") == 0


def test_caption_lengths_are_the_text_a_sample_holds_and_nothing_is_decoded(tmp_path):
    folder_with(tmp_path, [{"image": "ok.png", "caption": "a red circle"},
                           {"image": "ok.png", "caption": "红色的圆"}])
    dataset = build(tmp_path, prompts=["<Image><ImageHere></Image> Describe.", "<Image><ImageHere></Image> What?"])
    (tmp_path / "ok.png").unlink()  # lengths come from the annotation alone
    assert dataset.lengths() == [2 + 3, 2 + 4] and dataset.modality == "image"


def test_a_dialogue_counts_its_first_round(micro_world):
    qa, dialogue = (build_split(resolve_datasets(OmegaConf.create({"d": {"builder": "world_qa", "mode": mode,
                                                                          **micro_world}})), "train")["d"]
                    for mode in ("qa", "dialogue"))
    first_round = [text_length(dialogue.cfg.describe_prompt) + text_length(record[dialogue.cfg.caption_field])
                   for record, _, _ in dialogue.items]
    qa_text = [text_length(q) + text_length(a) for _, q, a in dialogue.items]
    assert dialogue.lengths() == [f + t for f, t in zip(first_round, qa_text)]
    assert qa.lengths() == [text_length(qa.cfg.question_prompt.format(question="")) + t for t in qa_text]
