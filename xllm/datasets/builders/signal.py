"""Signal-text datasets: JSON records holding a numeric series and the text it should produce.

A record is ``{"id", "signal": [[c1, c2, ...], ...] (steps x channels), "answer": ...}``. Every series is
checked at load time: a record with the wrong number of channels is an error naming the record and file.
Samples are ``{"id", "signal" ([channels, steps], normalised by ``SignalProcessor``), "prompt", "answer"}``.
With ``world`` set, the synthetic world's device-status samples are generated first.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from xllm.common.config import path_field
from xllm.datasets.registry import register_builder
from xllm.processors.signal import SignalProcessor
from xllm.datasets.builders.caption import not_text, prepare_storage, read_json_list
from xllm.world.device import CHANNEL_MEAN, CHANNEL_STD
from xllm.world.signals import WorldSignalSpec, write_world_signals


@dataclass
class SignalTextConfig:
    storage: str = path_field("folder", made_by="world", default="")
    world: dict[str, Any] | None = None  # WorldSignalSpec fields: generate the world's device-status samples
    annotations: str = "annotations/{split}.json"
    signal_field: str = "signal"
    answer_field: str = "answer"
    channels: int = 4
    mean: list[float] = field(default_factory=lambda: list(CHANNEL_MEAN))  # per channel, for normalisation
    std: list[float] = field(default_factory=lambda: list(CHANNEL_STD))
    lang: str = "en"
    prompts: list[str] = field(default_factory=lambda: ["<Signal><SignalHere></Signal> What should I do?"])
    max_samples: int | None = None


def read_signal_records(path: Path, cfg) -> list[dict]:
    """Records of a signal JSON, each series checked: [steps][channels] numbers with ``cfg.channels`` channels."""
    records = read_json_list(path, "signal annotation")
    for index, record in enumerate(records):
        name = f"record {index} (id {record.get('id')!r}) in {path}" if isinstance(record, dict) else f"record {index} in {path}"
        missing = [f for f in (cfg.signal_field, cfg.answer_field) if not isinstance(record, dict) or f not in record]
        if missing:
            raise ValueError(f"{name} lacks field {missing[0]!r}")
        series = record[cfg.signal_field]
        if not isinstance(series, list) or not series or not all(isinstance(row, list) for row in series):
            raise ValueError(f"{name}: field {cfg.signal_field!r} must be a non-empty list of steps, each a list "
                             "of channel values")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for row in series
                   for v in row):
            raise ValueError(f"{name}: field {cfg.signal_field!r} must hold finite numbers only")
        if not_text(record[cfg.answer_field]):
            raise ValueError(f"{name}: field {cfg.answer_field!r} must be a non-empty string, got "
                             f"{record[cfg.answer_field]!r}"[:300])
        widths = sorted({len(row) for row in series})
        if widths != [cfg.channels]:
            raise ValueError(f"{name}: signal has {widths if len(widths) > 1 else widths[0]} channel(s) per step, "
                             f"the config expects channels={cfg.channels}")
    return records


class SignalTextDataset(Dataset):
    def __init__(self, records: list[dict], cfg, training: bool) -> None:
        self.records, self.cfg, self.training = records, cfg, training
        self.processor = SignalProcessor(list(cfg.mean), list(cfg.std))

    modality = "signal"

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[float]:
        """Steps per series (``xllm.datasets.lengths``), what a batch of signals is padded along."""
        return [float(len(record[self.cfg.signal_field])) for record in self.records]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        prompt = random.choice(self.cfg.prompts) if self.training else self.cfg.prompts[0]
        return {"id": str(record.get("id", index)), "signal": self.processor(record[self.cfg.signal_field]),
                "prompt": prompt, "answer": record[self.cfg.answer_field]}

@register_builder("signal_text")
class SignalTextBuilder:
    Config = SignalTextConfig
    metric = "command"

    def __init__(self, cfg) -> None:
        if len(cfg.mean) != cfg.channels or len(cfg.std) != cfg.channels:
            raise ValueError(f"signal mean/std need {cfg.channels} values (one per channel), got "
                             f"{len(cfg.mean)} and {len(cfg.std)}")
        self.cfg = cfg

    def build(self, split: str) -> SignalTextDataset:
        root = prepare_storage(self.cfg, WorldSignalSpec, write_world_signals, kind="signals")
        records = read_signal_records(root / self.cfg.annotations.format(split=split), self.cfg)
        return SignalTextDataset(records[: self.cfg.max_samples], self.cfg, training=split == "train")
