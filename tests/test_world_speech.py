import json
import shutil
import subprocess

import pytest
import soundfile as sf

from xllm.datasets.builders.asr import read_kaldi_dir, read_manifest, read_table
from xllm.world import speech
from xllm.world.speech import synthesize

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)

UTTERANCES = [
    ("en_000", "A red circle is on the left.", "en"),
    ("en_001", "Two blue squares move to the right.", "en"),
    ("en_002", "The green triangle is small.", "en"),
    ("en_003", "There are three shapes.", "en"),
    ("zh_000", "一个红色的圆形在左边。", "zh"),
    ("zh_001", "两个蓝色的正方形。", "zh"),
]
VOICES = {"en": ("en-us", "en-gb", "en-us+f3"), "zh": ("cmn-latn-pinyin", "cmn-latn-pinyin+f3")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("speech")
    splits = synthesize(UTTERANCES, out, VOICES, seed=3, held_out_voice="en-gb")
    return out, splits


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_espeak
def test_deterministic_by_seed(corpus, tmp_path):
    out, splits = corpus
    again = synthesize(UTTERANCES, tmp_path / "again", VOICES, seed=3, held_out_voice="en-gb")
    assert again == splits
    assert files_of(tmp_path / "again") == files_of(out)
    other = synthesize(UTTERANCES[:2], tmp_path / "other", VOICES, seed=4)
    def choices(entries):
        return {e["id"]: (e["speaker"], e["speed"], e["pitch"]) for e in entries}

    seed3 = choices(e for entries in splits.values() for e in entries)
    seed4 = choices(other["train"])
    assert any(seed4[utt] != seed3[utt] for utt in seed4)


@needs_espeak
def test_audio_is_16k_mono_speech(corpus):
    out, splits = corpus
    for entries in splits.values():
        for entry in entries:
            info = sf.info(out / entry["audio"])
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 0.5 < info.duration < 10.0


@needs_espeak
def test_layout_consistent_and_held_out_voice(corpus):
    out, splits = corpus
    assert set(splits) == {"train", "test"}
    all_ids = set()
    for split, entries in splits.items():
        records = read_kaldi_dir(out / split)
        utt2spk = read_table(out / split / "utt2spk")
        manifest = read_manifest(out / f"{split}.jsonl")
        assert [r.utt_id for r in records] == sorted(utt2spk) == [r.utt_id for r in manifest]
        assert [(r.audio.resolve(), r.text) for r in records] == [(m.audio.resolve(), m.text) for m in manifest]
        assert all((utt2spk[m.utt_id] == m.extra["speaker"]) for m in manifest)
        assert all((speaker == "en-gb") == (split == "test") for speaker in utt2spk.values())
        all_ids |= set(utt2spk)
    assert all_ids == {u for u, _, _ in UTTERANCES}
    lines = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    zh = {entry["id"]: entry for entry in map(json.loads, lines)}
    assert zh["zh_000"]["text"] == "一个红色的圆形在左边。"
    assert zh["zh_000"]["speaker"].startswith("cmn-latn-pinyin")


@needs_espeak
def test_cmn_latn_pinyin_reads_characters_like_tone_number_pinyin():
    def phonemes(voice, text):
        command = ["espeak-ng", "-q", "-x", "-v", voice, text]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    assert phonemes("cmn-latn-pinyin", "你好世界") == phonemes("cmn-latn-pinyin", "ni3 hao3 shi4 jie4")
    # The plain cmn voice switches to English for the same text.
    assert "(en)" in phonemes("cmn", "你好世界")


def test_bad_inputs_are_rejected_before_speaking(tmp_path, monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: "/bin/true")
    with pytest.raises(ValueError, match="cmn-latn-pinyin"):
        synthesize([("a", "你好", "zh")], tmp_path, {"zh": ("cmn",)})
    with pytest.raises(ValueError, match="'a b'"):
        synthesize([("a b", "hi", "en")], tmp_path)
    with pytest.raises(ValueError, match="'fr'"):
        synthesize([("a", "salut", "fr")], tmp_path)
    with pytest.raises(ValueError, match="held_out_voice 'en-zz'"):
        synthesize([("a", "hi", "en")], tmp_path, held_out_voice="en-zz")


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        synthesize([("a", "hi", "en")], tmp_path)
