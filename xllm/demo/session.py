"""A multi-turn chat with a trained model: media attached along the way, answers streamed token by token.

``load_run(RUN)`` rebuilds the model a run trained (its saved ``config.yaml``, its latest checkpoint, LoRA merged
into the LLM), or loads a shared model folder, with the processors its config names; ``ChatSession`` keeps the
conversation (earlier rounds and every medium attached so far, in prompt order), so each reply sees the whole
dialogue, as the collator lays out multi-turn samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xllm.models.builder import build_processors, build_run
from xllm.models.lora import merge_lora
from xllm.models.share import is_model_folder
from xllm.models.xllm import XLLM
from xllm.processors.collator import media_span


def load_run(run: str | Path, device: str = "cpu", merge: bool = True) -> tuple[XLLM, dict]:
    """The model of a run folder (its ``config.yaml`` and latest checkpoint) or of a shared model folder
    (``XLLM.save_pretrained``), and its processors by modality. ``merge``: LoRA adapters (``model.llm.lora``) are
    merged into the LLM's weights, which answers the same faster."""
    model = XLLM.from_pretrained(run) if is_model_folder(run) else build_run(run)
    if merge:
        merge_lora(model)
    return model.to(device).eval(), build_processors(model.config)


@dataclass
class ChatSession:
    model: XLLM
    processors: dict
    max_new_tokens: int = 64
    history: list[tuple[str, str]] = field(default_factory=list)
    media: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # every medium so far, in prompt order
    pending: list[str] = field(default_factory=list)  # media spans the next question starts with

    def attach(self, modality: str, source) -> None:
        """A medium (a file path, or what the modality's processor reads) for the next question."""
        if modality not in self.processors:
            known = ", ".join(sorted(self.processors)) or "none"
            raise ValueError(f"this model reads no {modality} (its modalities with a processor: {known})")
        self.media.setdefault(modality, []).append(self.processors[modality](source))
        self.pending.append(media_span(modality))

    def reset(self) -> None:
        self.history, self.media, self.pending = [], {}, []

    def ask(self, question: str, **generation) -> Iterator[str]:
        """The reply so far after every new token; the round joins the history when the reply is complete."""
        query = "".join(self.pending) + (" " if self.pending else "") + question
        inputs = {"prompt": [query], "history": [list(self.history)],
                  **{m: list(items) for m, items in self.media.items()}}
        reply = ""
        for reply in self.model.stream(inputs, max_new_tokens=self.max_new_tokens, **generation):
            yield reply
        self.history.append((query, reply))
        self.pending = []
