import logging
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from xllm.processors.registry import PROCESSORS
from xllm.processors.audio import AudioProcessor, fbank, load_audio, log_mel, resample
from xllm.processors.collator import collate_media


def sine(freq: float, seconds: float, sr: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def peak_frequency(audio: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.argmax(spectrum) * sr / audio.size)


def write_with_av(path: Path, audio: np.ndarray, sr: int, codec: str, channels: int = 1) -> None:
    layout = "stereo" if channels == 2 else "mono"
    planar = np.tile(audio[None, :], (channels, 1)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sr)
        stream.layout = layout
        fmt = stream.codec_context.format.name
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, planar.shape[1], frame_size):
            chunk = planar[:, start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = sr
            frame.pts = start
            if fmt != "fltp":
                frame = av.audio.resampler.AudioResampler(format=fmt, layout=layout, rate=sr).resample(frame)[0]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_resample_preserves_frequency_and_duration():
    audio = sine(440.0, 1.0, 22050)
    out = resample(audio, 22050, 16000)
    assert out.dtype == np.float32
    assert out.size == 16000
    assert peak_frequency(out, 16000) == pytest.approx(440.0, abs=1.0)
    # Phase-aligned: away from the edges the output is the same sine sampled at 16 kHz.
    expected = sine(440.0, 1.0, 16000)
    assert np.abs(out[200:-200] - expected[200:-200]).max() < 1e-3


def test_load_wav_stereo_other_rate(tmp_path):
    left, right = sine(300.0, 1.0, 44100), sine(300.0, 1.0, 44100, amplitude=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size == 16000
    assert peak_frequency(audio, 16000) == pytest.approx(300.0, abs=1.0)
    # Mono is the channel mean: amplitude (0.5 + 0.1) / 2.
    assert np.abs(audio[1000:-1000]).max() == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize(
    "name, codec, sr, channels",
    [
        ("a.mp3", "mp3", 16000, 1),
        ("a.m4a", "aac", 44100, 2),
        ("a.ogg", "libopus", 48000, 1),
        ("a.mp4", "aac", 22050, 1),
    ],
)
def test_load_compressed(tmp_path, name, codec, sr, channels):
    path = tmp_path / name
    write_with_av(path, sine(500.0, 1.0, sr), sr, codec, channels)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 16000) < 0.1 * 16000
    assert peak_frequency(audio, 16000) == pytest.approx(500.0, abs=2.0)


def test_load_flac_matches_wav(tmp_path):
    # Integer samples, so both writers store exactly the same values.
    audio = np.round(sine(200.0, 0.5, 16000) * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", audio, 16000)
    sf.write(tmp_path / "a.flac", audio, 16000)
    loaded = load_audio(tmp_path / "a.flac")
    np.testing.assert_array_equal(loaded, audio / np.float32(32768))
    np.testing.assert_array_equal(loaded, load_audio(tmp_path / "a.wav"))


@pytest.mark.parametrize("name", ["cut.wav", "cut.flac", "cut.mp3"])
def test_truncated_file_is_an_error_naming_it(tmp_path, name):
    full = tmp_path / ("full" + Path(name).suffix)
    audio = sine(300.0, 2.0, 16000)
    if full.suffix == ".mp3":
        write_with_av(full, audio, 16000, "mp3")
    else:
        sf.write(full, audio, 16000)
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=name):
        load_audio(tmp_path / name)


@pytest.mark.parametrize("name", ["junk.wav", "junk.mp3"])
def test_corrupt_file_is_an_error_naming_it(tmp_path, name):
    (tmp_path / name).write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8)))
    with pytest.raises(ValueError, match=name):
        load_audio(tmp_path / name)


def test_log_mel_matches_whisper_feature_extractor():
    rng = np.random.default_rng(0)
    audio = (sine(440.0, 1.37, 16000) + 0.05 * rng.standard_normal(int(1.37 * 16000))).astype(np.float32)
    extractor = WhisperFeatureExtractor()
    ours = log_mel(audio)
    assert ours.shape == (80, audio.size // 160)
    theirs = extractor(audio, sampling_rate=16000, padding="longest", return_tensors="np").input_features[0]
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)
    padded = log_mel(audio, pad_to_seconds=30)
    assert padded.shape == (80, 3000)
    theirs_30s = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    np.testing.assert_allclose(padded.numpy(), theirs_30s, atol=1e-4)


def test_fbank_matches_kaldi_recipe_on_one_frame():
    audio = sine(1000.0, 0.5, 16000, amplitude=0.2) + sine(3000.0, 0.5, 16000, amplitude=0.1)
    feats = fbank(audio)
    assert feats.shape == (80, 1 + (audio.size - 400) // 160)
    # Frame 7, written out step by step the way Kaldi computes it.
    frame = audio[7 * 160 : 7 * 160 + 400].astype(np.float64) * 32768.0
    frame = frame - frame.mean()
    frame = np.concatenate([[frame[0] - 0.97 * frame[0]], frame[1:] - 0.97 * frame[:-1]])
    frame = frame * np.hanning(400) ** 0.85
    power = np.abs(np.fft.rfft(frame, 512)) ** 2
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731 - Kaldi's mel scale
    edges = np.linspace(mel(20.0), mel(8000.0), 82)
    bin_mel = mel(np.arange(257) * 16000 / 512)
    weights = np.clip(
        np.minimum((bin_mel[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None]),
                   (edges[2:, None] - bin_mel[None]) / (edges[2:, None] - edges[1:-1, None])),
        0.0,
        None,
    )
    expected = np.log(np.maximum(weights @ power, np.finfo(np.float32).eps))
    np.testing.assert_allclose(feats[:, 7].numpy(), expected, rtol=1e-4, atol=1e-3)


def test_features_of_different_lengths_batch_with_their_lengths():
    a, b = torch.ones(80, 5), torch.full((80, 3), 2.0)
    batch = collate_media([a, b])
    padded, lengths = batch["features"], batch["lengths"]
    assert padded.shape == (2, 80, 5)
    assert lengths.tolist() == [5, 3]
    assert (torch.arange(5)[None] < lengths[:, None]).tolist() == [[True] * 5, [True, True, True, False, False]]
    assert torch.equal(padded[1, :, :3], b) and (padded[1, :, 3:] == 0.0).all()
    with pytest.raises(ValueError, match="cannot batch media of shapes"):
        collate_media([torch.ones(80, 5), torch.ones(40, 5)])


def test_processor_registered_and_config_checked():
    assert PROCESSORS.get("audio") is AudioProcessor
    with pytest.raises(ValueError, match="n_mel"):
        AudioProcessor.from_config({"n_mel": 80})
    with pytest.raises(ValueError, match="feature"):
        AudioProcessor(feature="mfcc")


def test_processor_features(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, sine(440.0, 1.0, 8000), 8000)
    processor = AudioProcessor.from_config({"feature": "fbank", "n_mels": 40})
    feats = processor(path, utt_id="u1")
    assert feats.shape == (40, 1 + (16000 - 400) // 160)
    from_array = AudioProcessor()(sine(440.0, 1.0, 8000), utt_id="u1", sample_rate=8000)
    assert from_array.shape == (80, 100)


def test_processor_empty_audio_names_utterance(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"utt_empty.*empty\.wav.*empty"):
        AudioProcessor()(path, utt_id="utt_empty")


def test_processor_silence_is_flagged_once(caplog):
    processor = AudioProcessor()
    with caplog.at_level(logging.WARNING):
        first = processor(np.zeros(16000, dtype=np.float32), utt_id="quiet")
        processor(np.zeros(16000, dtype=np.float32), utt_id="quiet")
    assert first.shape == (80, 100) and torch.isfinite(first).all()
    assert processor.silent_utterances == {"quiet"}
    assert sum("quiet" in r.getMessage() and "silence" in r.getMessage() for r in caplog.records) == 1


def test_processor_too_long(caplog):
    audio = sine(440.0, 3.0, 16000)
    with caplog.at_level(logging.WARNING):
        trimmed = AudioProcessor(max_seconds=2.0)(audio, utt_id="long_one")
    assert trimmed.shape == (80, 200)
    assert any("long_one" in r.getMessage() and "trimmed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="long_one"):
        AudioProcessor(max_seconds=2.0, on_too_long="error")(audio, utt_id="long_one")


def test_processor_refuses_non_finite_samples_by_name(tmp_path):
    audio = sine(440.0, 0.5, 16000)
    audio[100:103] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match=r"utterance 'u9' \(<array>\): audio holds 3 NaN or infinite samples"):
        AudioProcessor()(audio, utt_id="u9")
    path = tmp_path / "nan.wav"
    sf.write(path, audio, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"nan\.wav: audio holds 3 NaN or infinite samples"):
        AudioProcessor()(path)
