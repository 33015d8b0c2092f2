"""Speech recognition as instructions: ``{"id", "speech", "prompt", "answer", "lang"}`` samples.

``speech`` is the log-mel [n_mels, frames] of the utterance; the generic collate pads a batch of them into
``{"features", "lengths"}``, the speech encoder's keyword arguments. The prompt places the speech with a
media span and asks for a transcript in the utterance's language; the answer is the transcript.

Two builders: ``asr_instruction`` over any corpus the ``asr`` readers know (Kaldi, AISHELL-1/2, manifests), and
``world_speech``, the synthetic world's spoken captions, synthesised into the cache on first use. Both are
scored with CER and WER (the ``asr`` metric), each utterance in its own language.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from xllm.datasets.registry import register_builder
from xllm.common.paths import resolve_path
from xllm.datasets.builders.asr import ASRBuilder, ASRBuilderConfig, ASRDataset, ASRRecord, read_manifest
from xllm.world.speech_corpus import WorldSpeechSpec, ensure_corpus, manifest_for
from xllm.processors.audio import AudioProcessor


def default_prompts() -> dict[str, list[str]]:
    return {"en": ["<Speech><SpeechHere></Speech> Transcribe the speech."],
            "zh": ["<Speech><SpeechHere></Speech>请忠实地识别该语音"]}


class SpeechInstructionDataset(ASRDataset):
    def __init__(self, records: list[ASRRecord], processor: AudioProcessor, prompts: dict[str, list[str]],
                 lang: str, training: bool) -> None:
        super().__init__(records, processor)
        self.prompts, self.lang, self.training = prompts, lang, training
        for record in records:
            language = self.language(record)
            if not record.text.strip():
                raise ValueError(f"utterance {record.utt_id!r} ({record.audio}) has an empty transcript")
            if language not in prompts:
                raise ValueError(f"utterance {record.utt_id!r} is in language {language!r} but the dataset's "
                                 f"'prompts' cover only {sorted(prompts)}")

    def language(self, record: ASRRecord) -> str:
        return record.extra.get("lang", self.lang)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        lang = self.language(record)
        # Training varies the instruction; evaluation always asks the first one, so scores are comparable.
        prompt = random.choice(self.prompts[lang]) if self.training else self.prompts[lang][0]
        speech = self.audio_processor(record.audio, utt_id=record.utt_id)
        return {"id": record.utt_id, "speech": speech, "prompt": prompt, "answer": record.text, "lang": lang}


@dataclass
class ASRInstructionConfig(ASRBuilderConfig):
    lang: str = "en"  # the transcripts' language when a record does not name one ("zh" scores characters)
    prompts: dict[str, list[str]] = field(default_factory=default_prompts)  # per language; the first evaluates


@register_builder("asr_instruction")
class ASRInstructionBuilder(ASRBuilder):
    Config = ASRInstructionConfig
    metric = "asr"

    def build(self, split: str) -> SpeechInstructionDataset:
        records = super().build(split).records
        return SpeechInstructionDataset(records, AudioProcessor.from_config(dict(self.cfg.audio)),
                                        prompts_of(self.cfg), self.cfg.lang, training=split == "train")


@dataclass
class WorldSpeechConfig:
    storage: str = ""  # the corpus folder; empty: a cache folder named by the spec
    world: dict[str, Any] = field(default_factory=dict)  # WorldSpeechSpec fields
    lang: str = "en"  # the held-out (test) voice's language, for scoring
    prompts: dict[str, list[str]] = field(default_factory=default_prompts)
    audio: dict[str, Any] = field(default_factory=dict)  # AudioProcessor options
    max_samples: int | None = None


@register_builder("world_speech")
class WorldSpeechBuilder:
    Config = WorldSpeechConfig
    metric = "asr"

    def __init__(self, cfg) -> None:
        try:
            self.spec = WorldSpeechSpec(**dict(cfg.world))
        except TypeError as error:
            raise ValueError(f"bad 'world' block {dict(cfg.world)}: {error}") from None
        self.cfg = cfg

    def records(self, split: str) -> list[ASRRecord]:
        """The split's utterances (``max_samples`` at most), the corpus synthesised first if need be."""
        root = ensure_corpus(self.spec, resolve_path(self.cfg.storage) if self.cfg.storage else None)
        manifest, prefix = manifest_for(root, split)
        return [r for r in read_manifest(manifest) if r.utt_id.startswith(prefix)][: self.cfg.max_samples]

    def build(self, split: str) -> SpeechInstructionDataset:
        cfg = self.cfg
        return SpeechInstructionDataset(self.records(split), AudioProcessor.from_config(dict(cfg.audio)),
                                        prompts_of(cfg), cfg.lang, training=split == "train")


def prompts_of(cfg) -> dict[str, list[str]]:
    """A dataset config's ``prompts`` per language, each language's list checked to be non-empty."""
    prompts = {lang: list(items) for lang, items in cfg.prompts.items()}
    empty = [lang for lang, items in prompts.items() if not items]
    if empty:
        raise ValueError(f"dataset 'prompts' for {empty} are empty: each language needs at least one prompt")
    return prompts
