"""Multimodal ASR (world_masr) and speech in stage 3: samples, a mixed batch, ASR scores in multitask, configs."""

import json
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from speech_fixtures import (micro_multimodal_model_cfg, micro_speech_corpus,  # noqa: F401  (fixtures)
                             micro_speech_encoder)

from xllm.config import load_config
from xllm.common.paths import configs_dir
from xllm.datasets.build import build_split
from xllm.datasets.builders.masr import scene_image
from xllm.datasets.loader import evaluation_loader, training_loader
from xllm.datasets.mixture import training_set
from xllm.world.scenes import Scene, parse_caption
from xllm.world.speech_corpus import WorldSpeechSpec, spoken_scenes
from xllm.models.builder import build_model
from xllm.eval.asr_metrics import asr_report
from xllm.eval.metrics import METRICS
from xllm.processors.image import ImageProcessor
from xllm.tasks.base import LLMTask

IMAGE_SIZE = 32  # the micro image encoder's input size


@pytest.fixture(scope="module")
def stage3_cfg(tmp_path_factory, micro_multimodal_model_cfg, micro_speech_corpus):
    """A stage-3 style config over the micro corpus: plain ASR and mASR in one ratio mixture."""
    root = tmp_path_factory.mktemp("masr")
    masr = {**micro_speech_corpus, "builder": "world_masr", "image_size": IMAGE_SIZE, "ratio": 1.0}
    config = {"model": micro_multimodal_model_cfg,
              "datasets": {"asr": {**micro_speech_corpus, "ratio": 1.0}, "masr": masr},
              "run": {"task": "llm", "output_dir": str(root / "run"), "eval_batch_size": 4,
                      "eval_max_samples": 8, "max_new_tokens": 4, "threads": 1}}
    OmegaConf.save(config, root / "stage3.yaml")
    return load_config(root / "stage3.yaml")


def languages(ids: list[str]) -> list[str]:
    return [utt_id.rsplit("-", 1)[1] for utt_id in ids]  # the world's ids end with the language


def test_masr_image_is_the_scene_its_transcript_describes(stage3_cfg):
    spec = WorldSpeechSpec(**stage3_cfg.datasets.masr.world)
    recovered = {utt_id: scene for utt_id, scene, _ in spoken_scenes(spec)}
    processor = ImageProcessor(IMAGE_SIZE)
    train = build_split(stage3_cfg.datasets, "train")["masr"]
    test = build_split(stage3_cfg.datasets, "test")["masr"]
    samples = [train[i] for i in range(len(train))] + [test[0]]
    assert {s["lang"] for s in samples} == {"en", "zh"}
    for sample in samples:
        spoken = Scene(tuple(parse_caption(sample["answer"], sample["lang"])))
        assert spoken == recovered[sample["id"]], sample["id"]
        expected = processor(scene_image(spoken, sample["id"], spec.seed, IMAGE_SIZE))
        assert sample["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.equal(sample["image"], expected), sample["id"]
        assert sample["speech"].shape[0] == 80
    assert not torch.equal(samples[0]["image"], samples[1]["image"])
    english = next(s for s in samples if s["lang"] == "en")
    chinese = next(s for s in samples if s["lang"] == "zh")
    assert english["prompt"] == ("<Image><ImageHere></Image> <Speech><SpeechHere></Speech> "
                                 "Transcribe the speech about the image.")
    assert chinese["prompt"] == "<Image><ImageHere></Image><Speech><SpeechHere></Speech>请忠实地识别该语音"


def test_a_transcript_that_is_not_its_scenes_caption_is_an_error_naming_the_utterance(stage3_cfg, tmp_path):
    storage = tmp_path / "corpus"
    shutil.copytree(stage3_cfg.datasets.masr.storage, storage)
    manifest = storage / "train.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    wrong = "a small red circle in the center." if entries[0]["lang"] == "en" else "中间有一个小的红色圆形。"
    assert entries[0]["text"] != wrong
    entries[0]["text"] = wrong
    manifest.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    cfg = OmegaConf.merge(stage3_cfg.datasets, {"masr": {"storage": str(storage)}})
    with pytest.raises(ValueError, match=rf"utterance '{entries[0]['id']}': transcript .* is not the caption"):
        build_split(OmegaConf.masked_copy(cfg, ["masr"]), "train")


def test_a_mixed_speech_batch_trains_both_interfaces_and_generates(stage3_cfg, one_thread):
    torch.manual_seed(0)
    model = build_model(stage3_cfg.model)
    sets = build_split(stage3_cfg.datasets, "train")
    samples = [{**sets["masr"][0], "task": "masr"}, {**sets["asr"][1], "task": "asr"},
               {**sets["masr"][2], "task": "masr"}]
    batch = model.collator()(samples)
    assert batch.media["image"].shape[0] == 2 and batch.media["speech"]["features"].shape[0] == 3
    out = LLMTask(stage3_cfg.run).train_step(model, batch)
    assert {"loss/asr", "loss/masr"} <= set(out.logs)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("interfaces.image.query_tokens", "interfaces.speech.input_proj.weight", "adapters.image.weight",
                 "adapters.speech.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    texts = model.generate(model.collator(with_answers=False)([sets["masr"][0], sets["masr"][2]]), max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_multitask_scores_speech_datasets_with_asr_metrics(stage3_cfg, one_thread):
    torch.manual_seed(0)
    model = build_model(stage3_cfg.model)
    task = LLMTask(stage3_cfg.run)
    for name in ("asr", "masr"):
        assert stage3_cfg.datasets[name].metric == "asr"  # the speech builders' own metric
        dataset = build_split(stage3_cfg.datasets, "train")[name]
        loader = evaluation_loader(dataset, task.collator(model, training=False), stage3_cfg.run.eval_batch_size)
        report, rows = task.evaluate(model, loader, stage3_cfg.datasets[name].metric, "en")
        assert len(rows) == stage3_cfg.run.eval_max_samples
        ids = [r["id"] for r in rows]
        assert set(languages(ids)) == {"en", "zh"}, "the rows should hold both languages"
        assert [r["lang"] for r in rows] == languages(ids)  # each utterance's own language, not the fallback
        expected = asr_report([r["reference"] for r in rows], [r["prediction"] for r in rows], languages(ids))
        assert report == expected, name


def test_the_asr_metric_scores_each_utterance_in_its_language(stage3_cfg):
    dataset = build_split(stage3_cfg.datasets, "train")["asr"]
    references = [r.text for r in dataset.records[:8]]
    langs = languages([r.utt_id for r in dataset.records[:8]])
    assert set(langs) == {"en", "zh"}
    hypotheses = [" ".join(ref.split()[1:]) if lang == "en" else ref[1:] for ref, lang in zip(references, langs)]
    report = METRICS.get("asr")(references, hypotheses, langs)
    assert report == asr_report(references, hypotheses, langs)
    assert report != asr_report(references, hypotheses, ["zh"] * len(references))  # languages matter


def test_stage3_configs_hold_speech():
    stage3 = load_config(configs_dir() / "tiny" / "stage3.yaml")
    assert "speech" in stage3.model.modalities
    checkpoints = list(stage3.model.checkpoint)
    assert checkpoints.index("outputs/tiny/stage1_speech") < checkpoints.index("outputs/tiny/stage2_speech")
    assert (stage3.datasets.asr.builder, stage3.datasets.masr.builder) == ("world_speech", "world_masr")
    path = configs_dir() / "tiny" / "eval_stage3.yaml"
    evaluation = load_config(path)
    assert list(evaluation.model.checkpoint) == checkpoints + ["outputs/tiny/stage3"]
    baseline = re.search(r"'model\.checkpoint=\[(.*?)\]'", path.read_text()).group(1).split(",")
    assert baseline == checkpoints  # the comment's stage-2 baseline command: every stage-3 starting weight
    assert {evaluation.datasets.asr.max_samples, evaluation.datasets.masr.max_samples} == {100}


def test_speech_lengths_are_the_decoded_seconds_and_grouped_batches_keep_masr_apart(stage3_cfg):
    datasets = stage3_cfg.datasets
    mixture = training_set(build_split(datasets, "train"), datasets, seed=0)
    lengths, modalities = mixture.lengths(), mixture.modalities()
    for index in range(0, len(mixture), 3):
        sample = mixture[index]
        frames = sample["speech"].shape[-1]  # one per 10 ms, the last partial one dropped
        assert frames / 100 <= lengths[index] < (frames + 1) / 100, sample["id"]
        assert modalities[index] == ("image+speech" if "image" in sample else "speech")
    batch = 4
    order = training_loader(mixture, lambda samples: samples, batch, seed=0, group_by_length=True).sampler._indices()
    assert sorted(order) == list(range(len(mixture))) and len(mixture) % (2 * batch) == 0
    assert all(len({modalities[i] for i in order[k:k + batch]}) == 1 for k in range(0, len(order), batch))
