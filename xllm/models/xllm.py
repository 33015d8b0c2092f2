"""The composite model: per modality a frozen encoder, a trainable interface and an adapter, and a frozen LLM.

A prompt names its media with markers such as ``<Image><ImageHere></Image>``: the LLM reads the text around
them as words, and each ``<ImageHere>`` becomes as many positions as the interface emits for that medium,
filled with the adapter's outputs. Media of one modality are given as one batch in the order their markers
appear across the prompts, so one prompt can hold several images, or none, anywhere in a multi-turn dialogue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from xllm.models.llm.base import IGNORE_INDEX, MEDIA_SLOT, LLMBackend

TAGS = {"image": "Image", "video": "Video", "speech": "Speech", "audio": "Audio"}


def tag_of(modality: str) -> str:
    """The prompt tag of a modality: ``<Image>``; new modalities get their name capitalised."""
    return TAGS.get(modality, modality.capitalize())


def marker(modality: str) -> str:
    return f"<{tag_of(modality)}Here>"


def media_span(modality: str) -> str:
    """The prompt text that places one medium: ``<Image><ImageHere></Image>``."""
    tag = tag_of(modality)
    return f"<{tag}><{tag}Here></{tag}>"


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor
    num_answer_tokens: int  # tokens the loss is the mean over (after the causal shift)


@dataclass
class Batch:
    """Left-padded model inputs; ``slots`` marks the positions media embeddings fill."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    slots: torch.Tensor
    order: list[tuple[str, int]]  # (modality, index) of each slot run, in row-major order


class Modality(nn.Module):
    """Encoder -> interface -> adapter for one kind of input."""

    def __init__(self, encoder: nn.Module, interface: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.encoder, self.interface, self.adapter = encoder, interface, adapter

    def forward(self, inputs: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One [length, llm_width] tensor per medium (lengths may differ, e.g. speech).

        ``inputs`` is a batch tensor, or a dict of the encoder's keyword arguments (padded ``features`` and
        their ``lengths``) for media of different lengths.
        """
        features, mask = self.encoder(**inputs) if isinstance(inputs, dict) else self.encoder(inputs)
        out, out_mask = self.interface(features, mask)
        embeddings = self.adapter(out)
        return [embeddings[i][out_mask[i]] for i in range(embeddings.shape[0])]


class XLLM(nn.Module):
    def __init__(self, llm: LLMBackend | None, modalities: dict[str, Modality]) -> None:
        super().__init__()
        self.llm = llm
        # Three flat dicts so that state-dict keys read ``interfaces.image.*``, ``adapters.image.*``: the
        # trainable manifests and the checkpoint converters name modules this way.
        self.encoders = nn.ModuleDict({m: mod.encoder for m, mod in modalities.items()})
        self.interfaces = nn.ModuleDict({m: mod.interface for m, mod in modalities.items()})
        self.adapters = nn.ModuleDict({m: mod.adapter for m, mod in modalities.items()})
        names = "|".join(re.escape(marker(m)) for m in modalities)
        self._marker_pattern = re.compile(f"({names})") if names else None
        self._marker_to_modality = {marker(m): m for m in modalities}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def modality(self, name: str) -> Modality:
        return Modality(self.encoders[name], self.interfaces[name], self.adapters[name])

    def encode_media(self, samples: dict) -> dict[str, list[torch.Tensor]]:
        return {m: self.modality(m)(samples[m]) for m in self.encoders if samples.get(m) is not None}

    # ----------------------------------------------------------------- sequence assembly

    def prompt_ids(self, text: str, media: dict[str, list[torch.Tensor]], order: list[tuple[str, int]]) -> list[int]:
        """Token ids of a formatted prompt with ``MEDIA_SLOT`` runs where its markers stand; ``order`` grows by
        one (modality, index) entry per marker."""
        cursor = {m: sum(1 for used, _ in order if used == m) for m in media}
        pieces = self._marker_pattern.split(text) if self._marker_pattern else [text]
        ids: list[int] = []
        for piece in pieces:
            modality = self._marker_to_modality.get(piece)
            if modality is None:
                if piece:
                    ids += self.llm.tokenize(piece)
                continue
            items = media.get(modality, [])
            if cursor[modality] >= len(items):
                raise ValueError(f"the prompts hold more {marker(modality)} markers than the {len(items)} "
                                 f"{modality} inputs given")
            ids += [MEDIA_SLOT] * items[cursor[modality]].shape[0]
            order.append((modality, cursor[modality]))
            cursor[modality] += 1
        return ids

    def assemble(self, samples: dict, media: dict[str, list[torch.Tensor]], with_answers: bool) -> Batch:
        prompts = samples["prompt"]
        histories = samples.get("history") or [None] * len(prompts)
        answers = samples["answer"] if with_answers else [None] * len(prompts)
        order: list[tuple[str, int]] = []
        rows = []
        for prompt, history, answer in zip(prompts, histories, answers):
            text = self.llm.format_prompt(prompt, history)
            rows.append(self.llm.build_sequence(self.prompt_ids(text, media, order), answer))
        for m, items in media.items():
            used = sum(1 for name, _ in order if name == m)
            if used != len(items):
                raise ValueError(f"{len(items)} {m} inputs given but the prompts hold {used} {marker(m)} markers")
        width = max(len(ids) for ids, _ in rows)
        pad = self.llm.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in rows])
        labels = torch.tensor([[IGNORE_INDEX] * (width - len(lab)) + lab for _, lab in rows])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
        slots = input_ids == MEDIA_SLOT
        input_ids[slots] = pad
        device = self.device
        return Batch(input_ids.to(device), attention_mask.to(device), labels.to(device), slots.to(device), order)

    def embed(self, batch: Batch, media: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        embeds = self.llm.embed(batch.input_ids)
        if media:
            # Row-major slot order is the order in which assembling consumed the media.
            ordered = torch.cat([media[m][i] for m, i in batch.order])
            embeds = embeds.masked_scatter(batch.slots.unsqueeze(-1), ordered.to(embeds.dtype))
        return embeds

    # ----------------------------------------------------------------- training and generation

    def forward(self, samples: dict, objective: Callable[["XLLM", dict], Any] | None = None):
        """LLM loss on the answers; ``samples`` holds ``prompt``, ``answer``, optional ``history`` and media.

        ``objective(model, samples)``, when given, is computed instead: a stage whose loss is not the LLM's (Q-Former
        pre-training) still runs inside the model's forward, where DDP's gradient synchronisation hooks in.
        """
        if objective is not None:
            return objective(self, samples)
        self._require_llm()
        media = self.encode_media(samples)
        batch = self.assemble(samples, media, with_answers=True)
        out = self.llm(batch.input_ids, self.embed(batch, media), batch.attention_mask, batch.labels)
        return Output(out.loss, out.logits, int((batch.labels[:, 1:] != IGNORE_INDEX).sum()))

    @torch.no_grad()
    def generate(self, samples: dict, max_new_tokens: int = 40, **generation_kwargs) -> list[str]:
        self._require_llm()
        media = self.encode_media(samples)
        batch = self.assemble(samples, media, with_answers=False)
        rows = self.llm.generate(batch.input_ids, self.embed(batch, media), batch.attention_mask,
                                 max_new_tokens, **generation_kwargs)
        return [self.llm.decode(ids) for ids in rows]

    def _require_llm(self) -> None:
        if self.llm is None:
            raise ValueError("this model was built without an LLM (model.llm.backend: none); it serves objectives "
                             "that never read one, such as Q-Former pre-training")
