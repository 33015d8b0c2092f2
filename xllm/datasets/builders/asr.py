"""Speech recognition corpora: Kaldi data directories, AISHELL-1, AISHELL-2 and JSON manifests.

Every reader returns a list of ``ASRRecord(utt_id, audio, text)`` sorted by utterance id, with audio paths
checked to exist. Utterances present in the audio list but not in the transcripts (or the reverse) are an
error listing them; ``skip_missing=True`` drops them and logs how many. Relative audio paths are resolved
against the folder of the file that lists them, so a corpus folder can be moved as a whole.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from xllm.common.config import choice, path_field
from xllm.common.paths import read_utf8, resolve_path
from xllm.processors.audio import AudioProcessor, audio_duration

logger = logging.getLogger(__name__)

LAYOUTS = ("kaldi", "aishell1", "aishell2", "manifest")
# How many offending utterances an error message lists before "...".
SHOWN = 10
AISHELL1_TRANSCRIPT = Path("transcript") / "aishell_transcript_v0.8.txt"


@dataclass(frozen=True)
class ASRRecord:
    utt_id: str
    audio: Path
    text: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other manifest fields (speaker, lang, ...)


def read_table(path: Path, sep: str | None = None) -> dict[str, str]:
    """A two-column ``key value`` file (Kaldi scp/text style): the first field, then the rest of the line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    table: dict[str, str] = {}
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(sep, 1)
        key, value = parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""
        if key in table:
            raise ValueError(f"{path}:{number}: utterance {key!r} appears twice")
        table[key] = value
    return table


def read_kaldi_dir(data_dir: str | Path, skip_missing: bool = False, text: str = "text",
                   sep: str | None = None) -> list[ASRRecord]:
    """A Kaldi data folder: ``wav.scp`` (``utt_id path``) and ``text`` (``utt_id transcript``)."""
    data_dir = Path(data_dir)
    wavs = read_table(data_dir / "wav.scp", sep)
    texts = read_table(data_dir / text, sep)
    return _join(wavs, texts, data_dir / "wav.scp", data_dir / text, data_dir, skip_missing)


def read_aishell2(data_dir: str | Path, skip_missing: bool = False) -> list[ASRRecord]:
    """An AISHELL-2 folder (``iOS/data`` and the like): a Kaldi folder, tab-separated, with ``trans.txt``."""
    return read_kaldi_dir(data_dir, skip_missing, text="trans.txt", sep="\t")


def read_aishell1(root: str | Path, split: str, skip_missing: bool = False) -> list[ASRRecord]:
    """AISHELL-1: ``data_aishell/wav/{split}/{speaker}/{utt}.wav`` and one transcript file for all splits.

    ``root`` is the folder holding ``data_aishell`` or ``data_aishell`` itself. The transcript separates words
    by spaces; they are joined so the text is plain Chinese. Transcript lines of other splits are not
    "missing": only the split's audio files are matched against the transcript.
    """
    root = Path(root)
    if (root / "data_aishell").is_dir():
        root = root / "data_aishell"
    split_dir = root / "wav" / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"AISHELL-1 split folder {split_dir} does not exist")
    transcript = read_table(root / AISHELL1_TRANSCRIPT)
    wavs = {path.stem: str(path) for path in sorted(split_dir.glob("*/*.wav"))}
    if not wavs:
        raise ValueError(f"no .wav files under {split_dir}/<speaker>/")
    texts = {utt: "".join(transcript[utt].split()) for utt in wavs if utt in transcript}
    return _join(wavs, texts, split_dir, root / AISHELL1_TRANSCRIPT, root, skip_missing)


def read_manifest(path: str | Path) -> list[ASRRecord]:
    """A JSON list or JSON-lines file of ``{"id", "audio", "text", ...}`` objects; other fields go to ``extra``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    content = read_utf8(path)
    try:
        if content.lstrip().startswith("["):
            entries = list(enumerate(json.loads(content), start=1))
        else:
            entries = [(n, json.loads(line)) for n, line in enumerate(content.splitlines(), start=1) if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"manifest {path} is not valid JSON / JSON lines: {error}") from None
    records, seen = [], set()
    for number, entry in entries:
        where = f"{path} entry {number}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        for key in ("id", "audio", "text"):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"{where}: field {key!r} is missing or not a string")
        if entry["id"] in seen:
            raise ValueError(f"{where}: utterance {entry['id']!r} appears twice")
        seen.add(entry["id"])
        extra = {k: v for k, v in entry.items() if k not in ("id", "audio", "text")}
        audio = _audio_path(entry["audio"], path.parent, entry["id"])
        records.append(ASRRecord(entry["id"], audio, entry["text"], extra))
    _check_audio_exists(records)
    return sorted(records, key=lambda r: r.utt_id)


def _join(wavs: dict[str, str], texts: dict[str, str], wav_source: Path, text_source: Path, base: Path,
          skip_missing: bool) -> list[ASRRecord]:
    no_text = sorted(set(wavs) - set(texts))
    no_audio = sorted(set(texts) - set(wavs))
    if (no_text or no_audio) and not skip_missing:
        problems = [f"{len(utts)} utterance(s) in {listed} have no {lacking} in {other}: {_few(utts)}"
                    for utts, listed, lacking, other in ((no_text, wav_source, "transcript", text_source),
                                                         (no_audio, text_source, "audio", wav_source)) if utts]
        raise ValueError("; ".join(problems) + " (skip_missing=True drops them)")
    if no_text or no_audio:
        logger.warning("skipped %d utterance(s) without transcript and %d without audio (%s, %s)", len(no_text),
                       len(no_audio), wav_source, text_source)
    records = [ASRRecord(utt, _audio_path(wavs[utt], base, utt), texts[utt]) for utt in sorted(set(wavs) & set(texts))]
    _check_audio_exists(records)
    return records


def _audio_path(spec: str, base: Path, utt_id: str) -> Path:
    if spec.rstrip().endswith("|"):
        raise ValueError(f"utterance {utt_id!r}: piped wav.scp commands are not supported ({spec!r}); "
                         "extract the audio first")
    path = Path(spec).expanduser()
    return path if path.is_absolute() else base / path


def _check_audio_exists(records: list[ASRRecord]) -> None:
    missing = [f"{r.utt_id} ({r.audio})" for r in records if not r.audio.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} audio file(s) do not exist: {_few(missing)}")


def _few(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


class ASRDataset(Dataset):
    """Records -> ``{"id", "features", "text"}`` through an audio processor (``AudioProcessor`` or any callable
    taking ``(path, utt_id=...)``)."""

    modality = "speech"

    def __init__(self, records: list[ASRRecord], audio_processor: Callable[..., torch.Tensor]) -> None:
        self.records, self.audio_processor = records, audio_processor

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[float]:
        """Seconds of audio per utterance (``xllm.datasets.lengths``): the manifest's ``duration`` where it gives
        one, else the file's header, at most the processor's ``max_seconds`` (longer audio is trimmed to it). A file
        whose header cannot be read counts 0 s: reading the sample names it (or skips it, ``on_bad_sample``)."""
        limit = getattr(self.audio_processor, "max_seconds", None)
        seconds = [self._seconds(record) for record in self.records]
        return seconds if limit is None else [min(s, limit) for s in seconds]

    @staticmethod
    def _seconds(record: ASRRecord) -> float:
        given = record.extra.get("duration")
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, (int, float)) or given < 0:
                raise ValueError(f"utterance {record.utt_id!r}: manifest field 'duration' must be a number of "
                                 f"seconds, got {given!r}")
            return float(given)
        try:
            return audio_duration(record.audio)
        except (OSError, ValueError):
            return 0.0

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            features = self.audio_processor(record.audio, utt_id=record.utt_id)
        except FileNotFoundError:
            raise FileNotFoundError(f"utterance {record.utt_id!r}: audio file {record.audio} does not exist") from None
        return {"id": record.utt_id, "features": features, "text": record.text}


@dataclass
class ASRBuilderConfig:
    storage: str = path_field("folder", default="")  # the corpus folder
    layout: str = choice(*LAYOUTS)
    # Where a split lives under storage: a data folder (kaldi, aishell2) or a manifest file; aishell1 uses the
    # split name itself (data_aishell/wav/{split}).
    split_path: str = "{split}"
    skip_missing: bool = False
    audio: dict[str, Any] = field(default_factory=dict)  # AudioProcessor options (feature, n_mels, max_seconds...)
    max_samples: int | None = None


class ASRBuilder:
    """A corpus's utterances, by split, in any of the layouts above (the base of the speech builders)."""

    Config = ASRBuilderConfig

    def __init__(self, cfg) -> None:
        if not cfg.storage:
            raise ValueError("the asr builder needs 'storage', the corpus folder")
        self.cfg = cfg

    def build(self, split: str) -> ASRDataset:
        cfg = self.cfg
        root = resolve_path(cfg.storage)
        location = root / cfg.split_path.format(split=split)
        if cfg.layout == "kaldi":
            records = read_kaldi_dir(location, cfg.skip_missing)
        elif cfg.layout == "aishell2":
            records = read_aishell2(location, cfg.skip_missing)
        elif cfg.layout == "aishell1":
            records = read_aishell1(root, split, cfg.skip_missing)
        else:
            records = read_manifest(location)
        return ASRDataset(records[: cfg.max_samples], AudioProcessor.from_config(dict(cfg.audio)))
