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
from xllm.common.config import load_config
from xllm.datasets.build import build_split
from xllm.datasets.collate import collate
from xllm.world.render import render
from xllm.world.scenes import sample_scene
from xllm.models.builder import build_model
from xllm.models.trainable import apply_trainable
from xllm.processors.image import ImageProcessor
from xllm.runners.runner import Runner
from xllm.tasks.speech import ASRTask, CIFASRTask, asr_report, transcript_ids


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
    runner = Runner(cfg, model, task, build_split(cfg.datasets, "train")["speech"],
                    build_split(cfg.datasets, "val")["speech"])
    return runner.train()


def test_stage1_overfits_a_batch_and_stage2_starts_from_its_checkpoint(tmp_path, micro_speech_model_cfg,
                                                                       micro_speech_corpus):
    cfg1 = config(tmp_path, micro_speech_model_cfg, micro_speech_corpus, "cif_asr", lr=3e-3)
    task1 = CIFASRTask(cfg1.run)
    torch.manual_seed(0)
    model = build_model(cfg1.model)
    apply_trainable(model, list(cfg1.model.trainable))
    batch = collate([build_split(cfg1.datasets, "train")["speech"][i] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = task1.train_step(model, batch)
    assert set(first.logs) == {"loss", "ce", "quantity"}
    assert first.weight == sum(len(model.llm.tokenize(a)) for a in batch["answer"])
    for _ in range(10):
        loss = task1.train_step(model, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task1.train_step(model, batch).loss.item() < 0.8 * first.loss.item()

    checkpoint = train(cfg1, task1)
    test_set = build_split(cfg1.datasets, "test")["speech"]
    trained = build_model(OmegaConf.merge(cfg1.model, {"checkpoint": str(checkpoint)}))
    metrics, rows = task1.evaluate(trained, test_set, "en")
    assert metrics["utterances"] == len(rows) == len(test_set)
    assert 0.0 <= metrics["cer"] and metrics["wer"] >= 0.0

    cfg2 = config(tmp_path, {**micro_speech_model_cfg, "checkpoint": str(checkpoint)}, micro_speech_corpus, "asr")
    stage2 = build_model(cfg2.model)
    saved = load_file(str(weights_path(checkpoint)))
    assert saved and all(torch.equal(stage2.state_dict()[k], v) for k, v in saved.items())
    task2 = ASRTask(cfg2.run)
    final = train(cfg2, task2)
    metrics, rows = task2.evaluate(build_model(OmegaConf.merge(cfg2.model, {"checkpoint": str(final)})),
                                   test_set, "en")
    assert metrics["utterances"] == len(test_set) and set(metrics) >= {"cer", "wer"}


def test_multimodal_asr_prompt_with_an_image_and_speech(tmp_path, micro_multimodal_model_cfg, micro_speech_corpus):
    cfg = config(tmp_path, micro_multimodal_model_cfg, micro_speech_corpus, "asr")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    apply_trainable(model, list(cfg.model.trainable))
    speech = build_split(cfg.datasets, "train")["speech"]
    rng = random.Random(0)
    image = ImageProcessor(32)(render(sample_scene(rng), 32, rng))
    prompt = "<Image><ImageHere></Image> <Speech><SpeechHere></Speech> Transcribe the speech about the image."
    samples = [{**speech[i], "image": image, "prompt": prompt} for i in range(2)]
    batch = collate(samples)
    media = model.encode_media(batch)
    assembled = model.assemble(batch, media, with_answers=True)
    fired = [m.shape[0] for m in media["speech"]]
    assert assembled.slots.sum(1).tolist() == [4 + n for n in fired]  # 4 image queries + the fired tokens
    out = model(batch)
    out.loss.backward()
    for name in ("interfaces.image.query_tokens", "interfaces.speech.input_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    texts = model.generate(batch, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_speech_longer_than_the_encoder_window_is_an_error(micro_speech_model_cfg, tmp_path, micro_speech_corpus):
    cfg = config(tmp_path, micro_speech_model_cfg, micro_speech_corpus, "asr")
    model = build_model(cfg.model)
    features = torch.zeros(1, 80, 1600)
    with pytest.raises(ValueError, match="more than Whisper's window of 1500"):
        model.encoders["speech"](features, torch.tensor([1600]))


class WordLLM:
    """An LLM stand-in whose word-level tokenizer lacks most characters."""

    def __init__(self) -> None:
        word = Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1, "circle": 2}, unk_token="[UNK]"))
        word.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]")

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def test_a_transcript_the_tokenizer_cannot_spell_is_an_error_naming_the_utterance():
    llm = WordLLM()
    assert transcript_ids(llm, "red circle", "u1") == [1, 2]
    with pytest.raises(ValueError, match="'u2'.*no token for"):
        transcript_ids(llm, "red 圆", "u2")


def test_asr_report_counts_every_hypothesis():
    report = asr_report(["A red circle.", "红色圆形"], ["a red", None], ["en", "zh"])
    # en: "a red circle" vs "a red": 1 word and 6 characters deleted; zh: all 4 characters deleted.
    assert report["wer"] == pytest.approx((1 + 1) / (3 + 1))
    assert report["cer"] == pytest.approx((6 + 4) / (10 + 4))
    assert report["utterances"] == 2 and report["empty_hypotheses"] == 1
