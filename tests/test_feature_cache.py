"""The frozen-encoder feature cache: written once, trained from with the same losses, refused when it does not fit."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from test_end_to_end import REPO, micro_options, run
from xllm.cache_features import trimmed, write_feature_cache
from xllm.common.config import typed
from xllm.config import RunConfig
from xllm.datasets.build import build_split
from xllm.datasets.builders.caption import CocoCaptionBuilder
from xllm.datasets.config import resolve_datasets
from xllm.datasets.feature_cache import with_feature_cache
from xllm.datasets.loader import training_loader
from xllm.datasets.mixture import training_set
from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.models.encoders.whisper import WhisperSpeechEncoder
from xllm.models.feature_cache import check_feature_caches
from xllm.models.xllm import Modality
from xllm.processors.batch import ENCODED
from xllm.processors.collator import collate_media
from xllm.processors.feature_cache import MANIFEST, FeatureCache, FeatureCacheError, MissingFromCache
from xllm.processors.image import ImageProcessor
from xllm.tasks.base import LLMTask
from xllm.tasks.retrieval import QFormerPretrainTask

pytestmark = pytest.mark.usefixtures("one_thread")


def build(model_cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(resolve_model(model_cfg))


def run_config(model_cfg: dict, datasets: dict, **run) -> OmegaConf:
    return OmegaConf.create({"model": resolve_model(model_cfg), "datasets": resolve_datasets(datasets),
                             "run": typed(RunConfig, {"eval_batch_size": 4, "num_workers": 0, **run}, "run")})


def captions(micro_world: dict, **options) -> dict:
    return {"world_caption": {"builder": "coco_caption", **micro_world, **options}}


def from_cache(datasets, folder: Path, **options):
    """The datasets section with every dataset reading ``folder`` (and ``options`` set on each)."""
    section = OmegaConf.to_container(datasets)
    for entry in section.values():
        entry.update(feature_cache=str(folder), **options)
    return resolve_datasets(section)


def encoder_calls(model) -> list:
    calls = []
    model.encoders["image"].register_forward_hook(lambda *args: calls.append(1))
    return calls


def step(task, model, batch, seed: int = 0):
    """One training step's output and gradients, from a fixed RNG state (ITM draws its hard negatives)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = task.train_step(model, batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_stage1_losses_and_gradients_equal_with_and_without_cache(stage1_cfg, micro_world, tmp_path):
    model = build(stage1_cfg)
    cfg = run_config(stage1_cfg, captions(micro_world), task="qformer_pretrain")
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"], batch_size=5)
    raw = build_split(cfg.datasets, "train")["world_caption"]
    cached = build_split(from_cache(cfg.datasets, tmp_path / "cache"), "train")["world_caption"]
    check_feature_caches(model, [cached])
    task = QFormerPretrainTask(cfg.run)
    collator = task.collator(model, training=True)
    model.train()
    calls = encoder_calls(model)
    without, grads_without = step(task, model, collator([raw[i] for i in range(6)]))
    assert len(calls) == 1
    batch = collator([cached[i] for i in range(6)])
    assert set(batch.media["image"]) == {ENCODED, "mask"}
    with_cache, grads_with = step(task, model, batch)
    assert len(calls) == 1  # the encoder did not run
    assert without.logs == with_cache.logs and set(without.logs) == {"loss", "itc", "itm", "itg"}
    assert torch.equal(without.loss, with_cache.loss)
    assert grads_without.keys() == grads_with.keys() and grads_with
    assert all(torch.equal(grads_without[n], grads_with[n]) for n in grads_with)


def test_stage2_loss_and_answers_equal_with_and_without_cache(micro_model_cfg, micro_world, tmp_path):
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(micro_world), max_new_tokens=4)
    write_feature_cache(model, cfg, tmp_path / "cache", ["train", "test"], dtype="float32")
    cached_cfg = from_cache(cfg.datasets, tmp_path / "cache")
    task = LLMTask(cfg.run)
    losses, answers = [], []
    for datasets in (cfg.datasets, cached_cfg):
        train, test = build_split(datasets, "train")["world_caption"], build_split(datasets, "test")["world_caption"]
        out, _ = step(task, model.train(), task.collator(model, training=True)([train[i] for i in range(4)]))
        losses.append(out.loss)
        answers.append(task.predict(model.eval(), task.collator(model, training=False)([test[i] for i in range(4)])))
    assert torch.equal(losses[0], losses[1]) and losses[0].item() > 0
    assert answers[0] == answers[1]


def test_stage3_mixture_trains_from_one_cache_of_two_datasets(micro_model_cfg, micro_world, tmp_path):
    model = build(micro_model_cfg)
    datasets = {**captions(micro_world, ratio=0.5),
                "world_qa": {"builder": "world_qa", "mode": "qa", "ratio": 0.5, **micro_world}}
    cfg = run_config(micro_model_cfg, datasets, batch_size=4)
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"])
    manifest = FeatureCache(tmp_path / "cache").manifest
    assert set(manifest["datasets"]) == {"world_caption", "world_qa"}
    assert manifest["modalities"]["image"]["encoder"]["name"] == "blip2_vision"
    task = LLMTask(cfg.run)
    outputs = []
    for section in (cfg.datasets, from_cache(cfg.datasets, tmp_path / "cache")):
        mixture = training_set(build_split(section, "train"), section, seed=0)
        batch = next(iter(training_loader(mixture, task.collator(model, training=True), 4, seed=0)))
        outputs.append(step(task, model.train(), batch)[0])
    assert "encoded" in batch.media["image"]
    assert outputs[0].logs == outputs[1].logs and any(key.startswith("loss/") for key in outputs[1].logs)


def copied_world(micro_world: dict, folder: Path) -> tuple[dict, list[dict]]:
    """The micro world copied into ``folder`` (to be changed), and its training records."""
    shutil.copytree(micro_world["storage"], folder)
    return {**micro_world, "storage": str(folder)}, json.loads((folder / "annotations" / "train.json").read_text())


def test_an_id_met_twice_is_stored_once_when_its_media_agree(micro_model_cfg, micro_world, tmp_path):
    """COCO gives an image several captions, each a record with the image's id: its features are stored once."""
    world, records = copied_world(micro_world, tmp_path / "world")
    annotations = Path(world["storage"]) / "annotations"
    (annotations / "twice_train.json").write_text(json.dumps(records[:3] + [{**records[0], "caption": "a star."}]))
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(world, annotations="annotations/twice_{split}.json"))
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"])
    samples = FeatureCache(tmp_path / "cache").split("world_caption", "train").samples
    assert list(samples) == [r["image_id"] for r in records[:3]]
    assert sorted(tuple(places["image"][0]) for places in samples.values()) == [(0, 0), (0, 1), (0, 2)]
    dataset = build_split(from_cache(cfg.datasets, tmp_path / "cache"), "train")["world_caption"]
    assert torch.equal(dataset[3]["image"][0].features, dataset[0]["image"][0].features)

    (annotations / "twice_train.json").write_text(json.dumps(records[:3] + [{**records[1], "image": records[0]["image"]}]))
    with pytest.raises(ValueError, match=f"sample id '{records[1]['image_id']}' comes twice with different media"):
        write_feature_cache(model, cfg, tmp_path / "conflict", ["train"])


def test_speech_rows_are_trimmed_and_padded_back_as_the_encoder_pads_them():
    torch.manual_seed(0)
    encoder = WhisperSpeechEncoder.build(WhisperSpeechEncoder.Config()).eval()
    modality = Modality(encoder, torch.nn.Identity(), torch.nn.Identity())
    utterances = [torch.randn(80, 30), torch.randn(80, 11), torch.randn(80, 24)]
    with torch.no_grad():
        features, mask = modality.encoded(collate_media(utterances))
    rows = [trimmed(features[i], mask[i]) for i in range(3)]
    assert [len(r.features) for r in rows] == [15, 6, 12] and all(bool(r.mask.all()) for r in rows)
    again, again_mask = modality.features(collate_media(rows))
    assert torch.equal(again, features) and torch.equal(again_mask, mask)


def test_a_cache_of_other_encoders_is_refused_naming_the_difference(micro_model_cfg, micro_world, tmp_path):
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(micro_world, max_samples=4))
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"])
    cached = build_split(from_cache(cfg.datasets, tmp_path / "cache"), "train").values()
    check_feature_caches(model, cached)  # the model it was written with

    other = OmegaConf.to_container(OmegaConf.create(micro_model_cfg))
    other["modalities"]["image"]["encoder"]["ln_vision_eps"] = 1e-5
    with pytest.raises(FeatureCacheError, match=r"model\.modalities\.image\.encoder\.ln_vision_eps: None in the "
                                                r"cache, 1e-05 configured") as error:
        check_feature_caches(build(other), cached)
    assert "weights_sha256" not in str(error.value)  # the same weights

    with torch.no_grad():
        model.encoders["image"].model.post_layernorm.weight.add_(0.5)
    with pytest.raises(FeatureCacheError, match=r"model\.modalities\.image\.weights_sha256: '[0-9a-f]{64}' in the "
                                                r"cache, '[0-9a-f]{64}' configured"):
        check_feature_caches(model, cached)


def test_a_cache_of_other_inputs_is_refused_naming_the_setting(micro_model_cfg, micro_world, tmp_path):
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(micro_world, max_samples=4))
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"])
    with pytest.raises(FeatureCacheError, match=r"datasets\.world_caption processor\.image\.image_size: 32 in the "
                                                r"cache, 48 configured"):
        build_split(from_cache(cfg.datasets, tmp_path / "cache", image_size=48), "train")
    with pytest.raises(FeatureCacheError, match="holds no 'val' split of dataset 'world_caption'"):
        build_split(from_cache(cfg.datasets, tmp_path / "cache"), "val")
    renamed = {"renamed": OmegaConf.to_container(from_cache(cfg.datasets, tmp_path / "cache"))["world_caption"]}
    with pytest.raises(FeatureCacheError, match="holds no dataset 'renamed' \\(it holds world_caption\\)"):
        build_split(resolve_datasets(renamed), "train")


class FlippingImageProcessor(ImageProcessor):
    """An image processor with a random horizontal flip: the augmentation a cache must refuse."""

    def __init__(self, image_size: int, flip_probability: float) -> None:
        super().__init__(image_size)
        self.flip_probability = flip_probability

    def random_transforms(self) -> dict:
        return {"flip_probability": self.flip_probability} if self.flip_probability else {}

    def __call__(self, image) -> torch.Tensor:
        pixels = super().__call__(image)
        return pixels.flip(-1) if random.random() < self.flip_probability else pixels


def test_random_augmentation_is_refused_naming_the_key(micro_model_cfg, micro_world, tmp_path, monkeypatch):
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(micro_world, max_samples=4))
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"])
    dataset = CocoCaptionBuilder(cfg.datasets.world_caption).build("train")
    dataset.processor = FlippingImageProcessor(32, flip_probability=0.5)
    with pytest.raises(FeatureCacheError, match="image processor augments at random \\(flip_probability=0.5\\)"):
        with_feature_cache(dataset, "world_caption", str(tmp_path / "cache"), "train")
    dataset.processor = FlippingImageProcessor(32, flip_probability=0.0)  # switched off: the same pixels
    assert with_feature_cache(dataset, "world_caption", str(tmp_path / "cache"), "train")[0]["image"]

    monkeypatch.setattr(CocoCaptionBuilder, "processor", lambda self: FlippingImageProcessor(32, 0.5))
    with pytest.raises(FeatureCacheError, match="flip_probability=0.5"):
        write_feature_cache(model, cfg, tmp_path / "again", ["train"])
    assert not (tmp_path / "again").exists()


def shards(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_a_damaged_shard_is_named_and_skipped_like_any_unreadable_sample(micro_model_cfg, micro_world, tmp_path):
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(micro_world, max_samples=6))
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"], shard_bytes=1)  # a shard per row
    first, second = shards(tmp_path / "cache")[:2]
    assert len(shards(tmp_path / "cache")) == 6
    first.write_bytes(first.read_bytes()[:-50])  # truncated
    data = bytearray(second.read_bytes())
    data[-3] ^= 0x10  # one bit flipped in the row's values
    second.write_bytes(bytes(data))

    dataset = build_split(from_cache(cfg.datasets, tmp_path / "cache"), "train")["world_caption"]
    with pytest.raises(ValueError, match=f"record 0: feature cache shard {first} is truncated or corrupt"):
        dataset[0]
    with pytest.raises(ValueError, match=f"record 1: feature cache shard {second}: row 0 is corrupt"):
        dataset[1]
    skipping = build_split(from_cache(cfg.datasets, tmp_path / "cache", on_bad_sample="skip"), "train")
    sample = skipping["world_caption"][0]  # replaced by the next readable one, the problem reported
    assert [p["record"] for p in sample["bad"]] == [0] and str(first) in sample["bad"][0]["error"]
    assert sample["id"] == dataset[2]["id"]
    (tmp_path / "cache" / "world_caption" / "train-00005.safetensors").unlink()
    with pytest.raises(ValueError, match="train-00005.safetensors is missing"):
        dataset[5]


def test_a_sample_missing_from_the_cache_is_named_even_when_skipping(micro_model_cfg, micro_world, tmp_path):
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(micro_world, max_samples=4))
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"])
    more = from_cache(cfg.datasets, tmp_path / "cache", max_samples=8, on_bad_sample="skip")
    dataset = build_split(more, "train")["world_caption"]
    missing = dataset.dataset.dataset.records[5]["image_id"]
    with pytest.raises(MissingFromCache, match=f"sample '{missing}' is not in the feature cache"):
        dataset[5]


def test_records_unreadable_when_written_are_unreadable_from_the_cache(micro_model_cfg, micro_world, tmp_path):
    world, records = copied_world(micro_world, tmp_path / "world")
    broken = Path(world["storage"]) / records[2]["image"]
    broken.write_bytes(b"not a png")
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(world, max_samples=4, on_bad_sample="skip"))
    write_feature_cache(model, cfg, tmp_path / "cache", ["train"])
    split = FeatureCache(tmp_path / "cache").split("world_caption", "train")
    assert list(split.unreadable) == ["2"] and str(broken) in split.unreadable["2"] and len(split.samples) == 3
    sample = build_split(from_cache(cfg.datasets, tmp_path / "cache"), "train")["world_caption"][2]
    assert sample["bad"][0]["record"] == 2 and "unreadable when the feature cache was written" in sample["bad"][0]["error"]
    assert sample["id"] == records[3]["image_id"]  # replaced by the next readable sample

    strict = run_config(micro_model_cfg, captions(world, max_samples=4))
    with pytest.raises(ValueError, match="record 2: cannot read image file"):
        write_feature_cache(model, strict, tmp_path / "strict", ["train"])


def test_a_killed_write_leaves_no_cache_and_an_old_cache_whole(micro_model_cfg, micro_world, tmp_path, monkeypatch):
    model = build(micro_model_cfg)
    cfg = run_config(micro_model_cfg, captions(micro_world, max_samples=4))
    out = tmp_path / "cache"

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("xllm.cache_features.write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            write_feature_cache(model, cfg, out, ["train"])
    assert not out.exists() and shards(tmp_path / "cache.tmp")
    with pytest.raises(FeatureCacheError, match="has no manifest.json; .*cache.tmp is one whose writing did not finish"):
        FeatureCache(out)

    write_feature_cache(model, cfg, out, ["train"])  # the staged leftovers are cleared first
    assert not (tmp_path / "cache.tmp").exists()
    before = (out / MANIFEST).read_text()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_feature_cache(model, cfg, out, ["train"])
    with monkeypatch.context() as patch:
        patch.setattr("xllm.cache_features.write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            write_feature_cache(model, cfg, out, ["train", "test"], overwrite=True)
    assert (out / MANIFEST).read_text() == before
    assert build_split(from_cache(cfg.datasets, out), "train")["world_caption"][0]["image"]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a feature cache"):
        write_feature_cache(model, cfg, tmp_path / "notes", ["train"], overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").is_file()


def test_the_script_writes_a_cache_that_train_py_trains_from(micro_zoo, micro_world, tmp_path):
    options = micro_options(micro_zoo, micro_world, tmp_path / "run")
    # The script's own folder leads its import path: the checkout's package is named first.
    written = subprocess.run([sys.executable, "scripts/cache_features.py", "--cfg-path", "configs/stage2_image.yaml",
                              "--splits", "train", "val", "--dtype", "bfloat16", "--out", str(tmp_path / "cache"),
                              "--options", *options], cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert written.returncode == 0, written.stderr[-3000:]
    cache = FeatureCache(tmp_path / "cache")
    assert cache.modalities["image"]["dtype"] == "bfloat16"
    row = cache.split("world_caption", "train").read(0, 0)
    assert row.features.dtype == torch.bfloat16 and row.mask.dtype == torch.bool
    trained = run(["train.py", "--cfg-path", "configs/stage2_image.yaml", "--options", *options,
                   f"datasets.world_caption.feature_cache={tmp_path / 'cache'}", "run.max_steps=2",
                   "run.batch_size=4", "run.num_workers=1"], REPO)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "model.safetensors").is_file()
    refused = run(["train.py", "--cfg-path", "configs/stage2_image.yaml", "--options", *options,
                   f"datasets.world_caption.feature_cache={tmp_path / 'cache'}", "run.max_steps=1",
                   "model.modalities.image.encoder.ln_vision_eps=1e-5"], REPO)
    assert refused.returncode != 0 and "encoder.ln_vision_eps: None in the cache, 1e-05 configured" in refused.stderr
