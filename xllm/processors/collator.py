"""Samples -> ``Batch``: the prompt layout and tokenisation, done in the DataLoader workers.

A sample is a dict of text fields (``id``, ``prompt``, ``answer``, ``history`` of earlier (query, answer)
rounds, ``train_history``, ``task``, ``lang``) and media fields named by modality (``image``, ``video``,
``speech``, ...), each a tensor, a list of tensors (several media in one prompt) or None. A prompt places a medium
with a span such as ``<Image><ImageHere></Image>``; the LLM's ``TextLayout`` formats the conversation (its chat
template, or ChatGLM's ``问：…\\n答：``) and lays out prompt + answer with labels on the answer; each
``<ImageHere>`` becomes one ``MEDIA_SLOT`` placeholder that the model widens to the medium's embeddings. The text
around a marker is tokenised apart from it, so a medium never merges with the characters next to it.

A training sample with ``train_history`` true learns the answers of its history too (a LLaVA conversation):
the layout's ``conversation`` gives its rows, one for a causal LM (every answer and its end token labelled,
the template's glue between them not), or one per round for ChatGLM's prefix LM. Such a sample may thus fill
several rows of a batch, each with the media its text places; ``llm.max_answer_length`` bounds each answer.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from xllm.processors.batch import ENCODED, IGNORE_INDEX, MEDIA_SLOT, NO_MEDIUM, Batch
from xllm.processors.feature_cache import EncodedMedium

log = logging.getLogger(__name__)

TEXT_FIELDS = ("id", "prompt", "answer", "history", "train_history", "task", "lang")
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


class TextLayout(Protocol):
    """The text side of an LLM backend: picklable, so that DataLoader workers can run it."""

    pad_token_id: int
    unk_token_id: int | None

    def format_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The prompt text for ``query`` after earlier (query, answer) rounds; media markers stay verbatim."""

    def tokenize(self, text: str) -> list[int]:
        """Ids of a piece of text, with no special tokens added."""

    def build_sequence(self, prompt_ids: list[int], answer: str | None) -> tuple[list[int], list[int]]:
        """Ids and labels of prompt + answer + its end token (``answer=None``: a generation prompt). ``MEDIA_SLOT``
        entries of ``prompt_ids`` come back in order; labels are ``IGNORE_INDEX`` but on the answer and end."""

    def conversation(self, rounds: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """The rows that learn every answer of ``rounds``, each a list of (text before the answer, answer)
        pieces, laid out one after another by ``build_sequence``. Each row reads the conversation from its start,
        so its media markers are the conversation's first ones. A layout whose rounds cannot be cut into such
        pieces (a chat template that does not extend one round's text by the next) raises ``ValueError``."""


@dataclass
class CaptionTokens:
    """Answers tokenised for an interface's own text branch (a Q-Former's BERT tokenizer, stage 1)."""

    tokenizer: Any  # a Hugging Face tokenizer with [CLS]/[SEP]/[PAD]
    max_length: int
    pad_to_max: bool = False  # equal widths on every rank, as gathering texts across processes needs

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max else "longest",
                                 truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}


def collate_media(items: list[torch.Tensor | EncodedMedium]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Equal shapes stack; shapes that differ in their last dimension only (speech frames, signal steps) are
    zero-padded there and come with their lengths, the encoder's keyword arguments. Encoder outputs read from a
    feature cache are zero-padded along their first dimension, with their masks, as the encoder pads a batch."""
    cached = [isinstance(t, EncodedMedium) for t in items]
    if any(cached):
        if not all(cached):
            raise ValueError("a batch mixes media read from a feature cache with raw media of the same modality: "
                             "give every dataset holding that modality a feature_cache, or none")
        return {ENCODED: pad_sequence([t.features for t in items], batch_first=True),
                "mask": pad_sequence([t.mask for t in items], batch_first=True)}
    if all(t.shape == items[0].shape for t in items):
        return torch.stack(items)
    if all(t.shape[:-1] == items[0].shape[:-1] for t in items):
        longest = max(t.shape[-1] for t in items)
        padded = torch.stack([F.pad(t, (0, longest - t.shape[-1])) for t in items])
        return {"features": padded, "lengths": torch.tensor([t.shape[-1] for t in items])}
    raise ValueError(f"cannot batch media of shapes {sorted({tuple(t.shape) for t in items})}")


def left_padded(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, labels) rows as left-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows]),
        "labels": torch.tensor([[IGNORE_INDEX] * (width - len(labels)) + labels for _, labels in rows]),
    }


def media_list(value: torch.Tensor | list | None) -> list[torch.Tensor]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def unbatched(media: torch.Tensor | dict | list | None) -> list[torch.Tensor]:
    """A batch of media (a tensor along its first dimension, or padded ``{"features", "lengths"}``) as a list."""
    if media is None:
        return []
    if isinstance(media, dict):
        return [features[..., :length] for features, length in zip(media["features"], media["lengths"].tolist())]
    return list(media)


class Collator:
    """``collator(samples) -> Batch``. ``with_answers=False`` lays out generation prompts (the answers stay in the
    batch as references)."""

    def __init__(self, modalities: Sequence[str], layout: TextLayout | None = None, with_answers: bool = True,
                 captions: CaptionTokens | None = None, max_answer_length: int | None = None) -> None:
        if max_answer_length is not None and max_answer_length < 1:
            raise ValueError(f"llm.max_answer_length={max_answer_length} keeps no answer token")
        self.modalities = tuple(modalities)
        self.layout, self.with_answers, self.captions = layout, with_answers, captions
        self.max_answer_length = max_answer_length
        self._markers = {marker(m): m for m in self.modalities}
        names = "|".join(re.escape(m) for m in self._markers)
        self._marker_pattern = re.compile(f"({names})") if names else None

    def __call__(self, samples: list[dict]) -> Batch:
        if not samples:
            raise ValueError("a batch needs at least one sample")
        # Problems of unreadable samples travel with the batch; a dropped one (evaluation) leaves it.
        bad = [problem for sample in samples for problem in sample.get("bad", ())]
        samples = [{k: v for k, v in s.items() if k != "bad"} for s in samples if not s.get("dropped")]
        if not samples:
            return Batch(ids=[], modalities=self.modalities, bad=bad)
        for index, sample in enumerate(samples):
            unknown = sorted(set(sample) - set(TEXT_FIELDS) - set(self.modalities))
            if unknown:
                raise ValueError(f"sample {sample.get('id', index)!r} holds {unknown}, which is neither a text field "
                                 f"({', '.join(TEXT_FIELDS)}) nor a modality of the model ({', '.join(self.modalities)})")
        ids = [str(s.get("id", i)) for i, s in enumerate(samples)]
        rows = None
        if self.layout is not None:
            # The batch follows the rows: a conversation learned round by round fills several.
            rows = [row for sample, sample_id in zip(samples, ids) for row in self._rows(sample, sample_id)]
            samples, ids = [sample for sample, _ in rows], [sample["id"] for sample, _ in rows]
        answers = [s.get("answer") for s in samples]
        batch = Batch(ids=ids, answers=answers, langs=[s.get("lang") for s in samples],
                      tasks=[s.get("task") for s in samples], modalities=self.modalities, bad=bad)
        for modality in self.modalities:
            items = [item for s in samples for item in media_list(s.get(modality))]
            if items:
                batch.media[modality] = collate_media(items)
        if rows is not None:
            self._lay_out(batch, [pieces for _, pieces in rows])
        # Prompts alone (generation) need no captions; a stage-1 batch needs every sample's.
        if self.captions is not None and any(a is not None for a in answers):
            if any(not isinstance(a, str) for a in answers):
                raise ValueError(f"samples {[i for i, a in zip(ids, answers) if not isinstance(a, str)]} have no "
                                 "answer (caption) for the interface's text branch")
            batch.captions = self.captions(answers)
        return batch

    def from_columns(self, inputs: dict) -> Batch:
        """A batch from ``{"prompt": [...], "image": <media in marker order across the prompts>, ...}`` (the
        notebook call ``model.generate({...})``): each prompt takes as many media as it holds markers."""
        prompts = list(inputs["prompt"])
        histories = inputs.get("history") or [None] * len(prompts)
        answers = inputs.get("answer") or [None] * len(prompts)
        samples = [{"id": str(i), "prompt": p, "history": h, "answer": a}
                   for i, (p, h, a) in enumerate(zip(prompts, histories, answers))]
        for modality in self.modalities:
            given = unbatched(inputs.get(modality))
            counts = [self._marker_counts(self._texts(s))[modality] for s in samples]
            if sum(counts) != len(given):
                raise ValueError(f"the prompts hold {sum(counts)} {marker(modality)} markers but {len(given)} "
                                 f"{modality} inputs were given")
            start = 0
            for sample, count in zip(samples, counts):
                sample[modality] = given[start:start + count]
                start += count
        return self(samples)

    # ----------------------------------------------------------------- text

    def _texts(self, sample: dict) -> list[str]:
        return [query for query, _ in sample.get("history") or []] + [sample.get("prompt") or ""]

    def _marker_counts(self, texts: Iterable[str]) -> Counter:
        if self._marker_pattern is None:
            return Counter()
        return Counter(self._markers[m] for text in texts for m in self._marker_pattern.findall(text))

    def _rows(self, sample: dict, sample_id: str) -> list[tuple[dict, list[tuple[str, str | None]]]]:
        """The sample's rows: (the sample with the row's id, answer and media; the row's (prompt text, answer)
        pieces). Generation asks for the last answer; training learns it, or with ``train_history`` every answer,
        in the rows the layout lays the conversation out in."""
        counts = self._marker_counts(self._texts(sample))
        for modality in self.modalities:
            given = len(media_list(sample.get(modality)))
            if counts[modality] != given:
                raise ValueError(f"sample {sample_id!r}: its prompt holds {counts[modality]} {marker(modality)} "
                                 f"markers but the sample has {given} {modality} input(s)")
        prompt, history, answer = sample.get("prompt") or "", list(sample.get("history") or []), sample.get("answer")
        sample = {**sample, "id": sample_id}
        if not self.with_answers:
            return [(sample, [(self.layout.format_prompt(prompt, history), None)])]
        if not isinstance(answer, str):
            raise ValueError(f"sample {sample_id!r} has no answer to train on")
        if not (sample.get("train_history") and history):
            return [(sample, [(self.layout.format_prompt(prompt, history), answer)])]
        try:
            conversation = self.layout.conversation(history + [(prompt, answer)])
        except ValueError as error:
            raise ValueError(f"sample {sample_id!r}: {error}") from None
        rows = []
        for pieces in conversation:
            # A row reads the conversation from its start, so its media are the sample's first ones.
            placed = self._marker_counts(text for text, _ in pieces)
            media = {m: media_list(sample.get(m))[:placed[m]] for m in self.modalities}
            rows.append(({**sample, **media, "answer": pieces[-1][1]}, pieces))
        return rows

    def _text_ids(self, text: str) -> tuple[list[int], list[int]]:
        """The ids of a prompt text with one ``MEDIA_SLOT`` per marker, and each marker's modality index."""
        pieces = self._marker_pattern.split(text) if self._marker_pattern else [text]
        ids: list[int] = []
        kinds: list[int] = []
        for piece in pieces:
            if piece in self._markers:
                ids.append(MEDIA_SLOT)
                kinds.append(self.modalities.index(self._markers[piece]))
            elif piece:
                ids += self.layout.tokenize(piece)
        return ids, kinds

    def _lay_out(self, batch: Batch, rows: list[list[tuple[str, str | None]]]) -> None:
        laid_out, kinds = [], []
        for pieces, sample_id in zip(rows, batch.ids):
            ids, labels = [], []
            for text, answer in pieces:
                prompt, slot_kinds = self._text_ids(text)
                piece_ids, piece_labels = self.layout.build_sequence(prompt, answer)
                piece_ids, piece_labels = self._within_budget(piece_ids, piece_labels, sample_id)
                self._check_known_tokens(piece_labels, answer, sample_id)
                ids += piece_ids
                labels += piece_labels
                kinds += slot_kinds
            laid_out.append((ids, labels))
        padded = left_padded(laid_out, self.layout.pad_token_id)
        input_ids, batch.attention_mask, batch.labels = padded["input_ids"], padded["attention_mask"], padded["labels"]
        slots = input_ids == MEDIA_SLOT
        batch.media_slots = torch.full_like(input_ids, NO_MEDIUM)
        batch.media_slots[slots] = torch.tensor(kinds, dtype=torch.long)
        input_ids[slots] = self.layout.pad_token_id
        batch.input_ids = input_ids

    def _within_budget(self, ids: list[int], labels: list[int], sample_id: str) -> tuple[list[int], list[int]]:
        """An answer longer than ``max_answer_length`` tokens keeps its first ones and its end token (each answer
        of a conversation on its own: ``ids`` and ``labels`` are one ``build_sequence``'s)."""
        answer = sum(label != IGNORE_INDEX for label in labels)
        budget = self.max_answer_length
        if budget is None or answer <= budget:
            return ids, labels
        keep = len(ids) - answer + budget - 1  # the prompt, then the answer's first budget - 1 tokens
        log.warning("sample %r: answer of %d tokens cut to %d (llm.max_answer_length)", sample_id, answer, budget)
        return ids[:keep] + ids[-1:], labels[:keep] + labels[-1:]

    def _check_known_tokens(self, labels: list[int], answer: str | None, sample_id: str) -> None:
        """An answer the tokenizer cannot spell would train the LLM to write its unknown token."""
        unknown = self.layout.unk_token_id
        if unknown is None or unknown not in labels:
            return
        pieces = []
        for word in dict.fromkeys(answer.split()):
            if unknown in self.layout.tokenize(word):
                # The characters when only some are unknown (a Chinese sentence is one "word"), else the word.
                chars = [ch for ch in dict.fromkeys(word) if unknown in self.layout.tokenize(ch)]
                pieces += chars if 0 < len(chars) < len(word) else [word]
        raise ValueError(f"sample {sample_id!r}: the LLM's tokenizer has no token for {pieces} in {answer!r}")
