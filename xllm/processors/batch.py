"""The ``Batch``: what the data pipeline hands the model, every field a tensor or a list with one entry per row.

A row is a sample, or one round of a conversation that an LLM learns round by round (``xllm.processors.collator``).

Text is laid out and tokenised in the DataLoader workers (``xllm.processors.collator``); each medium holds one
placeholder position in ``input_ids`` (``media_slots`` says which modality sits there), and the model widens it
to as many positions as that medium's interface emits, a number only the model knows (a C-Former fires as many
vectors as the speech holds tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, media, padding)
MEDIA_SLOT = -1  # a prompt position a medium fills; never looked up in an embedding
NO_MEDIUM = -1  # ``media_slots`` of text and padding positions
# ``Batch.media[m]`` read from a feature cache: the frozen encoder's outputs, {ENCODED: [N, length, ...], "mask"}.
ENCODED = "encoded"


def is_encoded(media) -> bool:
    """Whether a modality's batch media are encoder outputs (from a feature cache) rather than encoder inputs."""
    return isinstance(media, dict) and ENCODED in media


@dataclass
class Batch:
    ids: list[str]
    # Each modality's media in the order of their placeholders, row by row: a tensor of equal-sized media, the
    # encoder's keyword arguments ({"features", "lengths"}) for media padded along their last dimension, or the
    # encoder's outputs read from a feature cache ({"encoded", "mask"}, padded along their first dimension).
    media: dict[str, torch.Tensor | dict[str, torch.Tensor]] = field(default_factory=dict)
    # The LLM's inputs, left-padded (absent for a model without an LLM).
    input_ids: torch.Tensor | None = None  # [B, L], the pad id at padding and placeholders
    attention_mask: torch.Tensor | None = None  # [B, L], 0 on the left padding
    labels: torch.Tensor | None = None  # [B, L], IGNORE_INDEX but on the answer and its end token
    media_slots: torch.Tensor | None = None  # [B, L], index into ``modalities`` of the medium there, else NO_MEDIUM
    modalities: tuple[str, ...] = ()
    # Captions in an interface's own tokenizer (a Q-Former's text branch, stage 1): input_ids, attention_mask.
    captions: dict[str, torch.Tensor] | None = None
    answers: list[str | None] = field(default_factory=list)  # references for evaluation
    langs: list[str | None] = field(default_factory=list)
    tasks: list[str | None] = field(default_factory=list)  # a mixture's dataset name per sample
    # Unreadable samples replaced (training) or dropped (evaluation) in this batch: dataset, record, error.
    bad: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "Batch":
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def placeholder_modalities(self) -> list[str]:
        """The modality of every placeholder, in row-major order: the order the media are listed in."""
        rows, columns = (self.media_slots != NO_MEDIUM).nonzero(as_tuple=True)
        return [self.modalities[i] for i in self.media_slots[rows, columns].tolist()]
