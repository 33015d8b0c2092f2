"""Speech for the synthetic world: the world's sentences spoken by espeak-ng, in a Kaldi layout.

Each utterance gets a voice, a speed (words per minute, ``-s``) and a pitch (0-99, ``-p``) drawn from a
generator seeded by (seed, utterance id), so a corpus is reproducible and adding sentences does not change the
voices of the others. The speaker of an utterance is its voice name; the utterances of ``held_out_voice``
form the test split, so a test measures generalisation to an unseen speaker.

Mandarin uses the voice ``cmn-latn-pinyin``, not ``cmn``. Tried with espeak-ng 1.51: ``cmn-latn-pinyin``
takes Han characters directly (its dictionary converts them to pinyin, including the neutral tone of 的/个 and
tone sandhi of 一, which a character-by-character conversion would miss) and equally pinyin with tone numbers
("ni3 hao3") or tone marks; ``cmn`` reads the Latin letters of its own pinyin as English ("ni3" becomes
"nai three"). So Chinese text is passed as characters, unchanged.

Output, under ``out_dir``::

    wav/<utt_id>.wav                       16 kHz mono 16-bit
    <split>/wav.scp  <split>/text  <split>/utt2spk     audio paths relative to <split>/
    <split>.jsonl                          {"id", "audio", "text", "lang", "speaker", "speed", "pitch"}
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

import soundfile as sf

from xllm.processors.audio import SAMPLE_RATE, is_silent, load_audio

logger = logging.getLogger(__name__)

DEFAULT_VOICES: dict[str, tuple[str, ...]] = {
    "en": ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m7"),
    "zh": ("cmn-latn-pinyin", "cmn-latn-pinyin+f3"),
}
SPEEDS = (140, 155, 170, 185)
PITCHES = (35, 50, 65)
MANDARIN_VOICE = "cmn-latn-pinyin"
MIN_SECONDS = 0.1
INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"


def synthesize(utterances: Sequence[tuple[str, str, str]], out_dir: str | Path,
               voices: Mapping[str, Sequence[str]] | None = None, seed: int = 0, held_out_voice: str | None = None,
               workers: int = 4) -> dict[str, list[dict]]:
    """Speak ``(utt_id, text, lang)`` utterances (lang "en" or "zh") and write the corpus; returns split -> entries."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError(f"espeak-ng is not on PATH; the synthetic world's speech needs it: {INSTALL_HINT}")
    voices = {lang: tuple(names) for lang, names in (voices or DEFAULT_VOICES).items()}
    _check_inputs(utterances, voices, held_out_voice)
    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)

    entries = [_choose_voice(utt_id, text, lang, voices[lang], seed) for utt_id, text, lang in utterances]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda entry: _speak(binary, entry, out_dir), entries))

    splits: dict[str, list[dict]] = {}
    for entry in entries:
        split = "test" if entry["speaker"] == held_out_voice else "train"
        splits.setdefault(split, []).append(entry)
    if held_out_voice is not None and "test" not in splits:
        logger.warning("no utterance drew held_out_voice %r: there is no test split", held_out_voice)
    for split, split_entries in splits.items():
        _write_split(out_dir, split, sorted(split_entries, key=lambda e: e["id"]))
    return splits


def _check_inputs(utterances, voices: dict[str, tuple[str, ...]], held_out_voice: str | None) -> None:
    for voice in voices.get("zh", ()):
        if voice.split("+")[0] != MANDARIN_VOICE:
            raise ValueError(f"Mandarin voice {voice!r}: use {MANDARIN_VOICE!r} (optionally +variant); "
                             "the 'cmn' voice reads pinyin letters as English")
    seen = set()
    for utt_id, text, lang in utterances:
        if not utt_id or any(ch.isspace() for ch in utt_id):
            raise ValueError(f"utterance id {utt_id!r} is empty or contains whitespace (Kaldi tables split on it)")
        if utt_id in seen:
            raise ValueError(f"utterance id {utt_id!r} appears twice")
        seen.add(utt_id)
        if lang not in voices or not voices[lang]:
            raise ValueError(f"utterance {utt_id!r}: no voices for lang {lang!r}; voices are given for "
                             f"{sorted(voices)}")
        if not text.strip():
            raise ValueError(f"utterance {utt_id!r}: text is empty")
    all_voices = {v for names in voices.values() for v in names}
    if held_out_voice is not None and held_out_voice not in all_voices:
        raise ValueError(f"held_out_voice {held_out_voice!r} is not one of the voices {sorted(all_voices)}")


def _choose_voice(utt_id: str, text: str, lang: str, voices: tuple[str, ...], seed: int) -> dict:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    rng = random.Random(f"{seed}/{utt_id}")
    # The text on one line, as Kaldi tables require; the voice, speed and pitch drawn in that order.
    return {"id": utt_id, "audio": f"wav/{utt_id}.wav", "text": " ".join(text.split()), "lang": lang,
            "speaker": rng.choice(voices), "speed": rng.choice(SPEEDS), "pitch": rng.choice(PITCHES)}


def _speak(binary: str, entry: dict, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        command = [binary, "-v", entry["speaker"], "-s", str(entry["speed"]), "-p", str(entry["pitch"])]
        command += ["-w", str(raw), "--stdin"]
        result = subprocess.run(command, input=entry["text"], capture_output=True, text=True)
        if result.returncode != 0 or not raw.is_file():
            message = (result.stderr or result.stdout).strip()
            raise RuntimeError(f"utterance {entry['id']!r}: espeak-ng failed ({' '.join(command)}): {message}")
        # espeak-ng writes 22050 Hz; the corpus is 16 kHz like every speech encoder expects.
        audio = load_audio(raw, SAMPLE_RATE)
    if audio.size < MIN_SECONDS * SAMPLE_RATE or is_silent(audio):
        raise ValueError(f"utterance {entry['id']!r}: espeak-ng produced no speech for {entry['text']!r}")
    sf.write(out_dir / entry["audio"], audio, SAMPLE_RATE, subtype="PCM_16")


def _write_split(out_dir: Path, split: str, entries: list[dict]) -> None:
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "wav.scp").write_text("".join(f"{e['id']} ../{e['audio']}\n" for e in entries), encoding="utf-8")
    (split_dir / "text").write_text("".join(f"{e['id']} {e['text']}\n" for e in entries), encoding="utf-8")
    (split_dir / "utt2spk").write_text("".join(f"{e['id']} {e['speaker']}\n" for e in entries), encoding="utf-8")
    (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries),
                                            encoding="utf-8")
