import json
import logging
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from speech_fixtures import micro_speech_corpus  # noqa: F401  (fixture)

from xllm.datasets.config import resolve_datasets
from xllm.datasets.registry import BUILDERS
from xllm.datasets.builders.speech_instruction import default_prompts
from xllm.processors.collator import Collator
from xllm.world.speech_corpus import WorldSpeechSpec, utterances
from xllm.processors.audio import SAMPLE_RATE, log_mel


def build(block: dict, split: str):
    cfg = resolve_datasets({"speech": block}).speech
    return BUILDERS.get(cfg.builder)(cfg).build(split)


def test_corpus_scenes_are_deterministic_and_name_split_and_language():
    spec = WorldSpeechSpec(num_train=30, num_val=5, zh_ratio=0.5)
    rows = utterances(spec)
    assert rows == utterances(spec)
    assert len(rows) == 35 and {r[2] for r in rows} == {"en", "zh"}
    assert all(r[0].startswith(("train-", "val-")) and r[0].endswith(f"-{r[2]}") for r in rows)


def test_world_speech_splits_and_samples(micro_speech_corpus):
    train, val, test = (build(micro_speech_corpus, split) for split in ("train", "val", "test"))
    assert all(r.utt_id.startswith("train-") for r in train.records)
    assert all(r.utt_id.startswith("val-") for r in val.records)
    speakers = {r.extra["speaker"] for r in test.records}
    assert speakers == {WorldSpeechSpec().held_out_voice}  # the held-out voice, and only it
    assert WorldSpeechSpec().held_out_voice not in {r.extra["speaker"] for r in train.records + val.records}
    sample = test[0]
    assert sample["prompt"] == default_prompts()["en"][0] and sample["answer"] == test.records[0].text
    audio, rate = sf.read(test.records[0].audio, dtype="float32")
    assert rate == SAMPLE_RATE and torch.allclose(sample["speech"], log_mel(audio))
    chinese = next(i for i, r in enumerate(train.records) if r.utt_id.endswith("-zh"))
    assert train[chinese]["prompt"] == "<Speech><SpeechHere></Speech>请忠实地识别该语音"


def test_collate_pads_speech_into_encoder_keyword_arguments(micro_speech_corpus):
    train = build(micro_speech_corpus, "train")
    samples = [train[0], train[1], train[2]]
    batch = Collator(["speech"])(samples)
    lengths = [s["speech"].shape[1] for s in samples]
    assert batch.media["speech"]["lengths"].tolist() == lengths
    assert batch.media["speech"]["features"].shape == (3, 80, max(lengths))
    assert torch.equal(batch.media["speech"]["features"][1, :, : lengths[1]], samples[1]["speech"])
    assert batch.langs == [s["lang"] for s in samples] and batch.answers == [s["answer"] for s in samples]


# --------------------------------------------------------------------------- bad input, at the dataset level


@pytest.fixture
def corpus_copy(micro_speech_corpus, tmp_path) -> dict:
    """A writable copy of the micro corpus, as an ``asr_instruction`` block over its Kaldi test folder."""
    root = tmp_path / "corpus"
    shutil.copytree(micro_speech_corpus["storage"], root)
    return {"builder": "asr_instruction", "storage": str(root), "layout": "kaldi", "audio": {"max_seconds": 15}}


def first_wav(block: dict):
    record = build(block, "test").records[0]
    return record.utt_id, record.audio


def test_empty_audio_is_an_error_naming_the_utterance(corpus_copy):
    utt, wav = first_wav(corpus_copy)
    sf.write(wav, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match=f"{utt}.*empty"):
        build(corpus_copy, "test")[0]


def test_silent_audio_gives_silence_features_and_a_warning(corpus_copy, caplog):
    utt, wav = first_wav(corpus_copy)
    sf.write(wav, np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    with caplog.at_level(logging.WARNING):
        speech = build(corpus_copy, "test")[0]["speech"]
    assert speech.shape == (80, 100) and torch.all(speech == speech[0, 0])
    assert utt in caplog.text and "silence" in caplog.text


def test_truncated_and_corrupt_files_are_errors_naming_the_file(corpus_copy):
    _, wav = first_wav(corpus_copy)
    data = wav.read_bytes()
    wav.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{wav.name}.*truncated"):
        build(corpus_copy, "test")[0]
    wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    with pytest.raises(ValueError, match=wav.name):
        build(corpus_copy, "test")[0]


def test_audio_longer_than_the_window_is_trimmed_with_a_warning(corpus_copy, caplog):
    utt, wav = first_wav(corpus_copy)
    audio, _ = sf.read(wav, dtype="float32")
    sf.write(wav, np.tile(audio, int(16 * SAMPLE_RATE / audio.size) + 1), SAMPLE_RATE)
    with caplog.at_level(logging.WARNING):
        speech = build(corpus_copy, "test")[0]["speech"]
    assert speech.shape[1] == 15 * 100  # max_seconds of 10 ms frames
    assert utt in caplog.text and "trimmed" in caplog.text
    with pytest.raises(ValueError, match=f"{utt}.*longer than max_seconds"):
        build({**corpus_copy, "audio": {"max_seconds": 15, "on_too_long": "error"}}, "test")[0]


def test_another_sample_rate_is_resampled(corpus_copy):
    _, wav = first_wav(corpus_copy)
    audio, _ = sf.read(wav, dtype="float32")
    seconds = audio.size / SAMPLE_RATE
    sf.write(wav, audio[::2], SAMPLE_RATE // 2)  # the same speech at 8 kHz
    speech = build(corpus_copy, "test")[0]["speech"]
    assert abs(speech.shape[1] - seconds * 100) <= 2


def test_empty_transcript_and_unprompted_language_are_errors(corpus_copy, tmp_path):
    manifest = tmp_path / "m.jsonl"
    _, wav = first_wav(corpus_copy)
    manifest.write_text(json.dumps({"id": "u1", "audio": str(wav), "text": "  "}) + "\n")
    block = {**corpus_copy, "layout": "manifest", "split_path": str(manifest)}
    with pytest.raises(ValueError, match="'u1'.*empty transcript"):
        build(block, "test")
    manifest.write_text(json.dumps({"id": "u2", "audio": str(wav), "text": "bonjour", "lang": "fr"}) + "\n")
    with pytest.raises(ValueError, match="'u2'.*'fr'"):
        build(block, "test")
