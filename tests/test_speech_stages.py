"""Stage 1 (CIF ASR) and stage 2 (ASR through the LLM) on the micro models, a few steps each."""

import random

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from speech_fixtures import (micro_multimodal_model_cfg, micro_speech_corpus,  # noqa: F401  (fixtures)
                             micro_speech_encoder, micro_speech_model_cfg)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from xllm.common.checkpoint import weights_path
from xllm.config import load_config
from xllm.datasets.build import build_split
from xllm.datasets.loader import evaluation_loader, training_loader
from xllm.world.render import render
from xllm.world.scenes import sample_scene
from xllm.models.builder import build_model
from xllm.models.llm.hf_causal import HFChatLayout
from xllm.models.objectives.cif_asr import transcript_ids
from xllm.processors.collator import Collator
from xllm.processors.image import ImageProcessor
from xllm.runners.runner import Runner
from xllm.eval.asr_metrics import asr_report
from xllm.tasks.base import CIFSpeechTask as CIFASRTask, LLMTask


def config(tmp_path, model: dict, corpus: dict, task: str, **run) -> OmegaConf:
    path = tmp_path / f"{task}.yaml"
    OmegaConf.save({"model": model, "datasets": {"speech": corpus},
                    "run": {"task": task, "output_dir": str(tmp_path / task), "batch_size": 4, "eval_batch_size": 8,
                            "max_steps": 3, "log_interval": 1, "val_max_batches": 1, "threads": 1,
                            "max_new_tokens": 6, **run}}, path)
    return load_config(path)


def train(cfg, task) -> str:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    collator = task.collator(model, training=True)
    runner = Runner(cfg.run, model, task,
                    training_loader(build_split(cfg.datasets, "train")["speech"], collator, cfg.run.batch_size,
                                    cfg.run.seed),
                    evaluation_loader(build_split(cfg.datasets, "val")["speech"], collator, cfg.run.eval_batch_size))
    return runner.train()


def evaluate(task, model, dataset):
    loader = evaluation_loader(dataset, task.collator(model, training=False), task.cfg.eval_batch_size)
    return task.evaluate(model, loader, "asr", "en")


def test_stage1_overfits_a_batch_and_stage2_starts_from_its_checkpoint(tmp_path, micro_speech_model_cfg,
                                                                       micro_speech_corpus):
    cfg1 = config(tmp_path, micro_speech_model_cfg, micro_speech_corpus, "cif_asr", lr=3e-3)
    task1 = CIFASRTask(cfg1.run)
    torch.manual_seed(0)
    model = build_model(cfg1.model).train()
    batch = model.collator()([build_split(cfg1.datasets, "train")["speech"][i] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = task1.train_step(model, batch)
    assert set(first.logs) == {"loss", "ce", "quantity"}
    assert first.weight == sum(len(model.llm.layout.tokenize(a)) for a in batch.answers)
    for _ in range(10):
        loss = task1.train_step(model, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task1.train_step(model, batch).loss.item() < 0.8 * first.loss.item()

    checkpoint = train(cfg1, task1)
    test_set = build_split(cfg1.datasets, "test")["speech"]
    trained = build_model(OmegaConf.merge(cfg1.model, {"checkpoint": str(checkpoint)}))
    metrics, rows = evaluate(task1, trained, test_set)
    assert metrics["utterances"] == len(rows) == len(test_set)
    assert 0.0 <= metrics["cer"] and metrics["wer"] >= 0.0

    cfg2 = config(tmp_path, {**micro_speech_model_cfg, "checkpoint": str(checkpoint)}, micro_speech_corpus, "llm")
    stage2 = build_model(cfg2.model)
    saved = load_file(str(weights_path(checkpoint)))
    assert saved and all(torch.equal(stage2.state_dict()[k], v) for k, v in saved.items())
    task2 = LLMTask(cfg2.run)
    final = train(cfg2, task2)
    metrics, rows = evaluate(task2, build_model(OmegaConf.merge(cfg2.model, {"checkpoint": str(final)})), test_set)
    assert metrics["utterances"] == len(test_set) and set(metrics) >= {"cer", "wer"}


def test_multimodal_asr_prompt_with_an_image_and_speech(tmp_path, micro_multimodal_model_cfg, micro_speech_corpus):
    cfg = config(tmp_path, micro_multimodal_model_cfg, micro_speech_corpus, "llm")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    speech = build_split(cfg.datasets, "train")["speech"]
    rng = random.Random(0)
    image = ImageProcessor(32)(render(sample_scene(rng), 32, rng))
    prompt = "<Image><ImageHere></Image> <Speech><SpeechHere></Speech> Transcribe the speech about the image."
    samples = [{**speech[i], "image": image, "prompt": prompt} for i in range(2)]
    batch = model.collator()(samples)
    media, _ = model.encode(batch)
    inputs = model.splice(batch, media)
    fired = [m.shape[0] for m in media["speech"]]
    assert inputs.media_positions.sum(1).tolist() == [4 + n for n in fired]  # 4 image queries + the fired tokens
    out = model(batch)
    out.loss.backward()
    for name in ("interfaces.image.query_tokens", "interfaces.speech.input_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    texts = model.generate(model.collator(with_answers=False)(samples), max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_speech_longer_than_the_encoder_window_is_an_error(micro_speech_model_cfg, tmp_path, micro_speech_corpus):
    cfg = config(tmp_path, micro_speech_model_cfg, micro_speech_corpus, "llm")
    model = build_model(cfg.model)
    features = torch.zeros(1, 80, 1600)
    with pytest.raises(ValueError, match="more than Whisper's window of 1500"):
        model.encoders["speech"](features, torch.tensor([1600]))


def word_layout() -> HFChatLayout:
    """A layout whose word-level tokenizer lacks most characters."""
    word = Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1, "circle": 2, "</s>": 3}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFChatLayout(PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]", eos_token="</s>"))


def test_a_transcript_the_tokenizer_cannot_spell_is_an_error_naming_the_utterance():
    collate = Collator([], word_layout())
    batch = collate([{"id": "u1", "prompt": "red", "answer": "red circle"}])
    assert [ids.tolist() for ids in transcript_ids(batch)] == [[1, 2]]
    with pytest.raises(ValueError, match="sample 'u2': the LLM's tokenizer has no token for \\['圆'\\]"):
        collate([{"id": "u2", "prompt": "red", "answer": "red 圆"}])


def test_asr_report_counts_every_hypothesis():
    report = asr_report(["A red circle.", "红色圆形"], ["a red", None], ["en", "zh"])
    # en: "a red circle" vs "a red": 1 word and 6 characters deleted; zh: all 4 characters deleted.
    assert report["wer"] == pytest.approx((1 + 1) / (3 + 1))
    assert report["cer"] == pytest.approx((6 + 4) / (10 + 4))
    assert report["utterances"] == 2 and report["empty_hypotheses"] == 1
