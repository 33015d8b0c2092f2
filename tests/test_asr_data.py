import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from xllm.datasets.registry import BUILDERS
from xllm.common.config import ConfigError
from xllm.datasets.builders.speech_instruction import ASRInstructionBuilder
from xllm.datasets.config import resolve_datasets
from xllm.datasets.builders.asr import (ASRBuilder, ASRDataset, ASRRecord, read_aishell1, read_aishell2, read_kaldi_dir,
                                        read_manifest)
from xllm.processors.audio import AudioProcessor


def write_wav(path, seconds=0.3, sr=16000, freq=300.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr), sr)
    return path


def kaldi_dir(tmp_path, wav_ids, text_ids):
    for utt in wav_ids:
        write_wav(tmp_path / "wav" / f"{utt}.wav")
    (tmp_path / "wav.scp").write_text("".join(f"{u} wav/{u}.wav\n" for u in wav_ids))
    (tmp_path / "text").write_text("".join(f"{u} hello {u} world\n" for u in text_ids))
    return tmp_path


def test_kaldi_dir(tmp_path):
    records = read_kaldi_dir(kaldi_dir(tmp_path, ["b", "a"], ["a", "b"]))
    assert [(r.utt_id, r.audio, r.text) for r in records] == [
        ("a", tmp_path / "wav" / "a.wav", "hello a world"),
        ("b", tmp_path / "wav" / "b.wav", "hello b world"),
    ]


def test_kaldi_dir_mismatch_is_listed(tmp_path):
    data = kaldi_dir(tmp_path, ["a", "b", "c"], ["a", "b", "d"])
    with pytest.raises(ValueError) as error:
        read_kaldi_dir(data)
    message = str(error.value)
    assert f"1 utterance(s) in {data / 'wav.scp'} have no transcript in {data / 'text'}: c;" in message
    assert f"1 utterance(s) in {data / 'text'} have no audio in {data / 'wav.scp'}: d " in message


def test_kaldi_dir_skip_missing_logs_count(tmp_path, caplog):
    data = kaldi_dir(tmp_path, ["a", "b", "c"], ["a", "b", "d", "e"])
    with caplog.at_level(logging.WARNING):
        records = read_kaldi_dir(data, skip_missing=True)
    assert [r.utt_id for r in records] == ["a", "b"]
    assert any("1 utterance(s) without transcript and 2 without audio" in r.getMessage() for r in caplog.records)


def test_missing_audio_file_names_utterance_and_path(tmp_path):
    data = kaldi_dir(tmp_path, ["a", "b"], ["a", "b"])
    (data / "wav" / "b.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"b \(.*b\.wav\)"):
        read_kaldi_dir(data)


def test_aishell1(tmp_path):
    root = tmp_path / "data_aishell"
    write_wav(root / "wav" / "test" / "S0764" / "BAC009S0764W0121.wav")
    write_wav(root / "wav" / "test" / "S0764" / "BAC009S0764W0122.wav")
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0122.wav")
    (root / "transcript").mkdir()
    (root / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n"
        "BAC009S0764W0121 甚至 出现 交易 几乎 停滞 的 情况\n"
        "BAC009S0764W0122 一二 线 城市 虽然 也 处于 调整 中\n",
        encoding="utf-8",
    )
    records = read_aishell1(tmp_path, "test")
    assert [(r.utt_id, r.text) for r in records] == [
        ("BAC009S0764W0121", "甚至出现交易几乎停滞的情况"),
        ("BAC009S0764W0122", "一二线城市虽然也处于调整中"),
    ]
    assert records[0].audio == root / "wav" / "test" / "S0764" / "BAC009S0764W0121.wav"
    # A wav without a transcript line is reported.
    write_wav(root / "wav" / "test" / "S0764" / "BAC009S0764W0999.wav")
    with pytest.raises(ValueError, match="BAC009S0764W0999"):
        read_aishell1(root, "test")
    assert len(read_aishell1(root, "test", skip_missing=True)) == 2


def test_aishell2(tmp_path):
    write_wav(tmp_path / "wav" / "C0001" / "IC0001W0001.wav")
    write_wav(tmp_path / "wav" / "C0001" / "IC0001W0002.wav")
    (tmp_path / "wav.scp").write_text(
        "IC0001W0001\twav/C0001/IC0001W0001.wav\nIC0001W0002\twav/C0001/IC0001W0002.wav\n"
    )
    (tmp_path / "trans.txt").write_text("IC0001W0001\t厨房用具\nIC0001W0002\t电蒸锅\n", encoding="utf-8")
    records = read_aishell2(tmp_path)
    assert [(r.utt_id, r.text) for r in records] == [("IC0001W0001", "厨房用具"), ("IC0001W0002", "电蒸锅")]


def test_manifest_json_lines_and_list(tmp_path):
    write_wav(tmp_path / "audio" / "x.wav")
    entries = [{"id": "x", "audio": "audio/x.wav", "text": "hi there", "lang": "en"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    (tmp_path / "m.json").write_text(json.dumps(entries))
    for name in ("m.jsonl", "m.json"):
        (record,) = read_manifest(tmp_path / name)
        assert (record.utt_id, record.audio, record.text) == ("x", tmp_path / "audio" / "x.wav", "hi there")
        assert record.extra == {"lang": "en"}


def test_manifest_errors_name_entry_and_field(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "audio": "x.wav"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl entry 1: field 'text'"):
        read_manifest(tmp_path / "bad.jsonl")


def test_dataset_returns_features(tmp_path):
    records = read_kaldi_dir(kaldi_dir(tmp_path, ["a", "b"], ["a", "b"]))
    dataset = ASRDataset(records, AudioProcessor())
    item = dataset[1]
    assert item["id"] == "b" and item["text"] == "hello b world"
    assert isinstance(item["features"], torch.Tensor) and item["features"].shape == (80, 30)
    (tmp_path / "wav" / "a.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"'a'.*a\.wav"):
        dataset[0]


def test_registered_builder(tmp_path):
    kaldi_dir(tmp_path / "dev", ["a", "b", "c"], ["a", "b", "c"])
    builder_class = BUILDERS.get("asr_instruction")
    assert builder_class is ASRInstructionBuilder and issubclass(builder_class, ASRBuilder)
    config = resolve_datasets({"d": {"builder": "asr_instruction", "storage": str(tmp_path),
                                     "audio": {"feature": "fbank", "n_mels": 40}, "max_samples": 2}}).d
    dataset = builder_class(config).build("dev")
    assert len(dataset) == 2
    assert dataset[0]["speech"].shape == (40, 1 + (4800 - 400) // 160)
    with pytest.raises(ConfigError, match="datasets.d.layout' must be one of 'kaldi'"):
        resolve_datasets({"d": {"builder": "asr_instruction", "storage": str(tmp_path), "layout": "csv"}})


def test_text_files_that_are_not_utf8_are_named(tmp_path):
    from xllm.datasets.builders.asr import read_manifest, read_table

    (tmp_path / "text").write_bytes("utt1 caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"text is not UTF-8 text \(byte 8"):
        read_table(tmp_path / "text")
    (tmp_path / "m.jsonl").write_bytes('{"id": "u", "audio": "a.wav", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"m\.jsonl is not UTF-8 text"):
        read_manifest(tmp_path / "m.jsonl")


def test_lengths_are_seconds_from_the_header_or_the_manifest_without_decoding(tmp_path):
    for utt, seconds in (("a", 0.3), ("b", 1.25), ("c", 2.5)):
        write_wav(tmp_path / "audio" / f"{utt}.wav", seconds=seconds)
    entries = [{"id": "a", "audio": "audio/a.wav", "text": "x"}, {"id": "b", "audio": "audio/b.wav", "text": "y"},
               {"id": "c", "audio": "audio/c.wav", "text": "z", "duration": 7.0}]  # a manifest's figure wins
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    records = read_manifest(tmp_path / "m.jsonl")
    assert ASRDataset(records, AudioProcessor()).lengths() == [0.3, 1.25, 7.0]
    assert ASRDataset(records, AudioProcessor(max_seconds=1.0)).lengths() == [0.3, 1.0, 1.0]  # trimmed to it
    (tmp_path / "audio" / "b.wav").write_bytes(b"RIFF....WAVEbroken")  # named when the sample is read
    assert ASRDataset(records, AudioProcessor()).lengths() == [0.3, 0.0, 7.0]
    assert ASRDataset(records, AudioProcessor()).modality == "speech"
    bad = [ASRRecord("d", tmp_path / "audio" / "a.wav", "x", {"duration": "long"})]
    with pytest.raises(ValueError, match=r"utterance 'd': manifest field 'duration' must be a number of seconds"):
        ASRDataset(bad, AudioProcessor()).lengths()
