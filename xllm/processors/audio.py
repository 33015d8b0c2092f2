"""Speech audio: loading, resampling and the features the speech encoders read.

Everything works on float32 mono waveforms in [-1, 1] at 16 kHz. ``log_mel`` reproduces Whisper's
features (transformers' ``WhisperFeatureExtractor``) without forcing the 30 s window; ``fbank`` gives the
Kaldi-style filterbanks most CTC/CIF ASR models were trained on.
"""

from __future__ import annotations

import functools
import logging
import struct
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Mapping

import av
import numpy as np
import soundfile as sf
import torch
from av.audio.resampler import AudioResampler
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from xllm.processors.registry import register_processor

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SOUNDFILE_SUFFIXES = (".wav", ".flac")
# Whisper: 25 ms windows every 10 ms, 80 mel bins up to 8 kHz.
WHISPER_N_FFT = 400
WHISPER_HOP = 160
# A waveform whose peak is below this (about -140 dBFS) carries no signal at 16- or 24-bit resolution.
SILENCE_PEAK = 1e-7
# Decoded compressed audio shorter than its declared duration by more than this is a truncated file;
# the slack absorbs encoder delay and padding, which make the two differ by a few codec frames.
TRUNCATION_SLACK_SECONDS = 0.25


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """A file as float32 mono (channels averaged) at ``target_sr``: WAV/FLAC with soundfile, anything else PyAV.
    A missing file raises FileNotFoundError; a corrupt or truncated one ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    read = _read_soundfile if path.suffix.lower() in SOUNDFILE_SUFFIXES else _read_av
    channels, sample_rate = read(path)
    return resample(channels.mean(axis=0, dtype=np.float32), sample_rate, target_sr)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono waveform with libswresample (through PyAV).

    libswresample's windowed-sinc filter is band-limited and phase-aligned (no added delay), FFmpeg is
    already a dependency for decoding, and it handles any rate ratio (22050 -> 16000 is 320/441).
    """
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if orig_sr == target_sr or audio.size == 0:
        return audio
    resampler = AudioResampler(format="fltp", layout="mono", rate=target_sr)
    frame = av.AudioFrame.from_ndarray(audio[None, :], format="fltp", layout="mono")
    frame.sample_rate = orig_sr
    # Passing None flushes the filter's tail, without which the last few milliseconds are lost.
    out = [f.to_ndarray()[0] for frames in (resampler.resample(frame), resampler.resample(None)) for f in frames]
    return np.concatenate(out).astype(np.float32, copy=False)


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    _check_wav_complete(path)
    try:
        data, sample_rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"cannot read audio file {path}: {error}") from error
    return data.T, sample_rate


def _check_wav_complete(path: Path) -> None:
    """libsndfile silently shortens a WAV whose data chunk is cut off; compare the declared size instead."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(12)[8:12] != b"WAVE":
            return
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                # 0 and 0xFFFFFFFF mean "length unknown" (streamed writers, RF64).
                if chunk_size not in (0, 0xFFFFFFFF) and offset + 8 + chunk_size > size:
                    raise ValueError(f"audio file {path} is truncated: its data chunk declares {chunk_size} bytes "
                                     f"but only {size - offset - 8} are present")
                return
            offset += 8 + chunk_size + (chunk_size & 1)


def _read_av(path: Path) -> tuple[np.ndarray, int]:
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"audio file {path} has no audio stream")
            stream = container.streams.audio[0]
            sample_rate = stream.codec_context.sample_rate
            # Planar float at the native rate and layout: one row per channel, mixing is done by the caller.
            to_float = AudioResampler(format="fltp")
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
            declared = container.duration / av.time_base if container.duration else None
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot decode audio file {path}: {error}") from error
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), sample_rate
    data = np.concatenate(chunks, axis=1)
    decoded = data.shape[1] / sample_rate
    if declared is not None and decoded < declared - TRUNCATION_SLACK_SECONDS:
        raise ValueError(f"audio file {path} is truncated: decoded {decoded:.2f} s of a declared {declared:.2f} s")
    return data, sample_rate


def audio_duration(path: str | Path) -> float:
    """Seconds of audio in a file, read from its header without decoding it: soundfile for WAV/FLAC, PyAV's
    container duration otherwise. A missing file raises FileNotFoundError; an unreadable header ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            return float(sf.info(str(path)).duration)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise ValueError(f"cannot read the header of audio file {path}: {error}") from error
    try:
        with av.open(str(path)) as container:
            if container.duration is None:
                raise ValueError(f"audio file {path} declares no duration in its header")
            return container.duration / av.time_base
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot read the header of audio file {path}: {error}") from error


def is_silent(audio: np.ndarray) -> bool:
    """True when the waveform holds no signal (all zeros, or below 16-bit resolution)."""
    return audio.size > 0 and float(np.abs(audio).max()) < SILENCE_PEAK


def log_mel(audio: np.ndarray, n_mels: int = 80, sample_rate: int = SAMPLE_RATE,
            pad_to_seconds: float | None = None) -> torch.Tensor:
    """Whisper's log-mel spectrogram, [n_mels, len(audio) // 160] (10 ms frames).

    Identical to ``WhisperFeatureExtractor`` with ``padding="longest"``; with ``pad_to_seconds=30`` identical
    to its default 30 s window. Audio shorter than one 25 ms window is zero-padded to one window.
    """
    audio = _checked_waveform(audio)
    if pad_to_seconds is not None:
        target = int(round(pad_to_seconds * sample_rate))
        if audio.size > target:
            raise ValueError(f"audio of {audio.size / sample_rate:.2f} s does not fit pad_to_seconds={pad_to_seconds}")
        audio = np.pad(audio, (0, target - audio.size))
    waveform = torch.from_numpy(np.pad(audio, (0, max(WHISPER_N_FFT - audio.size, 0))))
    # One torch.stft over every frame, as WhisperFeatureExtractor's torch path computes it: transformers' numpy
    # ``spectrogram`` loops over frames in Python, about 10x slower, and this runs once per utterance in the workers.
    window = torch.hann_window(WHISPER_N_FFT)
    stft = torch.stft(waveform, WHISPER_N_FFT, WHISPER_HOP, window=window, return_complex=True)
    # Whisper drops the last centred frame, clips the dynamic range to 80 dB below the loudest bin and
    # rescales to roughly [-1, 1].
    power = (stft[:, :-1].abs() ** 2).contiguous()
    spec = (whisper_mel_filters(n_mels, sample_rate).T @ power).clamp_min(1e-10).log10()
    spec = torch.maximum(spec, spec.max() - 8.0)
    return (spec + 4.0) / 4.0


@functools.lru_cache(maxsize=8)
def whisper_mel_filters(n_mels: int, sample_rate: int) -> torch.Tensor:
    """Whisper's Slaney mel filters, [201 frequency bins, n_mels]: the same for every utterance, so made once."""
    return torch.from_numpy(mel_filter_bank(num_frequency_bins=1 + WHISPER_N_FFT // 2, num_mel_filters=n_mels,
                                            min_frequency=0.0, max_frequency=8000.0, sampling_rate=sample_rate,
                                            norm="slaney", mel_scale="slaney")).float()


def fbank(audio: np.ndarray, num_mel_bins: int = 80, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Kaldi ``compute-fbank-feats`` defaults, [num_mel_bins, frames] with frames = 1 + (len - 400) // 160.

    Povey window, DC removal, pre-emphasis 0.97, 512-point FFT, power spectrum, natural log, snip edges.
    The waveform is scaled to the 16-bit integer range first, as Kaldi reads it, so the values match
    models trained on Kaldi features.
    """
    audio = _checked_waveform(audio)
    frame_length = sample_rate * 25 // 1000
    mel_filters = mel_filter_bank(num_frequency_bins=257, num_mel_filters=num_mel_bins, min_frequency=20.0,
                                  max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm=None,
                                  mel_scale="kaldi", triangularize_in_mel_space=True)
    spec = spectrogram(np.pad(audio, (0, max(frame_length - audio.size, 0))) * 32768.0,
                       window_function(frame_length, "povey", periodic=False), frame_length=frame_length,
                       hop_length=sample_rate // 100, fft_length=512, power=2.0, center=False, preemphasis=0.97,
                       mel_filters=mel_filters, log_mel="log", mel_floor=float(np.finfo(np.float32).eps),
                       remove_dc_offset=True)
    return torch.from_numpy(spec.astype(np.float32))


def _checked_waveform(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape [samples], got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("cannot compute features of an empty waveform")
    return audio


FEATURES = ("log_mel", "fbank")
ON_TOO_LONG = ("trim", "error")


@dataclass
class AudioConfig:
    sample_rate: int = SAMPLE_RATE
    feature: str = "log_mel"  # "log_mel" (Whisper) or "fbank" (Kaldi)
    n_mels: int = 80
    max_seconds: float | None = 30.0  # None: no limit
    on_too_long: str = "trim"  # "trim" (with a warning) or "error"


@register_processor("audio")
@dataclass
class AudioProcessor(AudioConfig):
    """A file path or waveform -> [n_mels, frames] features, with the bad-input rules of a training set.

    - empty audio: ValueError naming the utterance and file;
    - all-silent audio: features of silence, the utterance logged once and added to ``silent_utterances``;
    - corrupt or truncated file: ValueError naming the file;
    - longer than ``max_seconds``: trimmed with a warning naming the utterance, or ValueError if
      ``on_too_long="error"``;
    - another sample rate: resampled (files always; arrays when their ``sample_rate`` is given).
    """

    Config = AudioConfig

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {self.feature!r}")
        if self.on_too_long not in ON_TOO_LONG:
            raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {self.on_too_long!r}")
        self.silent_utterances: set[str] = set()

    @classmethod
    def from_config(cls, cfg: "AudioProcessor.Config | Mapping") -> "AudioProcessor":
        options = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
        options.pop("name", None)  # a config block's registry name, not an option
        known = [f.name for f in fields(cls.Config)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown audio processor option(s) {unknown}; known: {known}")
        return cls(**options)

    def settings(self) -> dict:
        """What the features depend on (a feature cache records it)."""
        return {f.name: getattr(self, f.name) for f in fields(AudioConfig)}

    def __call__(self, path_or_array: str | Path | np.ndarray, utt_id: str | None = None,
                 sample_rate: int | None = None) -> torch.Tensor:
        if isinstance(path_or_array, (str, Path)):
            source = str(path_or_array)
            audio = load_audio(path_or_array, self.sample_rate)
        else:
            source = "<array>"
            audio = np.asarray(path_or_array, dtype=np.float32)
            if sample_rate is not None:
                audio = resample(audio, sample_rate, self.sample_rate)
        name = f"utterance {utt_id!r} ({source})" if utt_id is not None else source
        if audio.size == 0:
            raise ValueError(f"{name}: audio is empty")
        if not np.isfinite(audio).all():  # features of NaN samples would be NaN, and so would the loss
            raise ValueError(f"{name}: audio holds {int((~np.isfinite(audio)).sum())} NaN or infinite samples")
        audio = self._limit_length(audio, name)
        if is_silent(audio):
            key = utt_id if utt_id is not None else source
            if key not in self.silent_utterances:
                self.silent_utterances.add(key)
                logger.warning("%s: audio is all silence", name)
        features = log_mel if self.feature == "log_mel" else fbank
        return features(audio, self.n_mels, self.sample_rate)

    def _limit_length(self, audio: np.ndarray, name: str) -> np.ndarray:
        limit = None if self.max_seconds is None else int(self.max_seconds * self.sample_rate)
        if limit is None or audio.size <= limit:
            return audio
        seconds = audio.size / self.sample_rate
        if self.on_too_long == "error":
            raise ValueError(f"{name}: audio is {seconds:.2f} s, longer than max_seconds={self.max_seconds}")
        logger.warning("%s: audio is %.2f s, trimmed to max_seconds=%s", name, seconds, self.max_seconds)
        return audio[:limit]
