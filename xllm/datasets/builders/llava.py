"""LLaVA's instruction data: multi-turn conversations about an image (X-LLM's stage-3 data is in this format).

A record is ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
{"from": "gpt", "value": "..."}, ...]}``: human and gpt turns in alternation, ending with gpt. It becomes one
sample whose last round is the ``prompt`` and ``answer`` and whose earlier rounds are the ``history``; with
``loss_on: all_turns`` (the default) the sample sets ``train_history``, so the LLM learns every gpt turn, each
closed by its end token, and none of the human turns or the template around them (``xllm.processors.collator``).
``last_turn`` learns the last answer alone, as ``world_qa``'s dialogues do.

LLaVA's ``<image>`` may stand before or after the first question (with the newline next to it); it is taken out
and the project's media span goes at the start of the first question, where LLaVA's own preprocessing moves the
image. Every turn loses its surrounding white space, as LLaVA strips the turn holding the image: a template
that trims its messages would otherwise render another text than the one labelled. A record without ``image``
is a text-only conversation. With ``world`` set, the synthetic world's images are written with their
conversations (``xllm.world.conversations``) and read from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from xllm.common.config import choice, path_field
from xllm.common.paths import resolve_path
from xllm.datasets.builders.caption import log_dropped, not_text, prepare_storage, read_json_list
from xllm.datasets.guard import note_dropped
from xllm.datasets.lengths import text_length
from xllm.datasets.registry import register_builder
from xllm.processors.collator import media_span
from xllm.processors.image import ImageProcessor
from xllm.world.conversations import IMAGE_TOKEN, write_world_conversations
from xllm.world.images import WorldImageSpec

log = logging.getLogger(__name__)
SPEAKERS = ("human", "gpt")


@dataclass
class LlavaConversationConfig:
    # A LLaVA JSON file per split ({train: ..., val: ...}) and the folder the records' image names start in.
    annotations: dict[str, str] = path_field("file", made_by="world", default_factory=dict)
    image_root: str = path_field("folder", made_by="world", default="")
    world: dict[str, Any] | None = None  # WorldImageSpec fields: write the world's conversations and read those
    storage: str = ""  # where ``world`` writes; empty: a cache folder named by the world's spec
    loss_on: str = choice("all_turns", "last_turn")  # the gpt turns the LLM learns
    lang: str = "en"  # the answers' language, for evaluation ("zh" scores characters)
    image_size: int = 224  # the image encoder's input size
    on_bad_sample: str = choice("error", "skip")  # "error" stops at a malformed record; "skip" drops it, counted
    max_samples: int | None = None


@dataclass(frozen=True)
class Conversation:
    id: str
    image: str | None  # the image file, relative to the image root; None for a text-only conversation
    rounds: list[tuple[str, str]]  # (human, gpt) pairs; the first human turn holds the media span


def read_conversation(record: Any, index: int, path: Path) -> Conversation:
    """A LLaVA record checked and with its image placed; a malformed one is an error naming the file and index."""
    where = f"record {index} in {path}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object, found {type(record).__name__}")
    if "conversations" not in record:
        raise ValueError(f"{where} lacks field 'conversations'")
    turns, image = record["conversations"], record.get("image")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list of turns, got {turns!r}"[:300])
    if image is not None and not_text(image):
        raise ValueError(f"{where}: field 'image' must be a file name, got {image!r}"[:300])
    values = []
    for number, turn in enumerate(turns):
        speaker = SPEAKERS[number % 2]
        if not isinstance(turn, dict) or turn.get("from") != speaker:
            raise ValueError(f"{where}: turn {number} must be from {speaker!r} (turns alternate human, gpt, ...), "
                             f"got {turn!r}"[:300])
        if not_text(turn.get("value")):
            raise ValueError(f"{where}: turn {number} must have a non-empty string 'value', got "
                             f"{turn.get('value')!r}"[:300])
        values.append(turn["value"].strip())
    if len(values) % 2:
        raise ValueError(f"{where}: its last turn ({len(values) - 1}) is a human turn that no gpt answer follows")
    holding = [number for number, value in enumerate(values) if IMAGE_TOKEN in value]
    if holding and image is None:
        raise ValueError(f"{where}: turn {holding[0]} holds {IMAGE_TOKEN} but the record names no 'image'")
    found = sum(value.count(IMAGE_TOKEN) for value in values)
    if holding and (holding != [0] or found > 1):
        raise ValueError(f"{where}: {IMAGE_TOKEN} may stand once, in the first human turn; found {found} in turns "
                         f"{holding}")
    if image is not None:
        question = values[0].replace(IMAGE_TOKEN, "").strip()
        values[0] = f"{media_span('image')} {question}".rstrip()
    return Conversation(str(record.get("id", index)), image, list(zip(values[0::2], values[1::2])))


def read_conversations(path: Path, on_bad_sample: str) -> tuple[list[Conversation], list[dict]]:
    """The conversations of a LLaVA JSON file, and those dropped (``on_bad_sample: skip``) as ``{"record",
    "error"}``; otherwise a malformed record is an error."""
    records = read_json_list(path, "LLaVA conversation")
    kept, dropped = [], []
    for index, record in enumerate(records):
        try:
            kept.append(read_conversation(record, index, path))
        except ValueError as error:
            if on_bad_sample != "skip":
                raise ValueError(f"{error} (set on_bad_sample: skip to drop such records)") from None
            dropped.append({"record": index, "error": str(error)})
    log_dropped(dropped, len(records), path)
    return kept, dropped


class LlavaConversationDataset(Dataset):
    """``{"id", "prompt", "answer", "history", "train_history"}`` samples, with ``image`` when the record has one."""

    def __init__(self, conversations: list[Conversation], image_root: Path, processor: ImageProcessor,
                 train_history: bool) -> None:
        self.conversations, self.image_root, self.processor = conversations, image_root, processor
        self.train_history = train_history

    def __len__(self) -> int:
        return len(self.conversations)

    def lengths(self) -> list[float]:
        """Text units per record (``xllm.datasets.lengths``): every turn, since a causal LM reads them all in
        one row; the image is of one size."""
        return [sum(text_length(q) + text_length(a) for q, a in c.rounds) for c in self.conversations]

    def modalities(self) -> list[str]:
        return ["text" if c.image is None else "image" for c in self.conversations]

    def __getitem__(self, index: int) -> dict:
        conversation = self.conversations[index]
        *history, (prompt, answer) = conversation.rounds
        sample = {"id": conversation.id, "prompt": prompt, "answer": answer, "history": history,
                  "train_history": self.train_history}
        if conversation.image is not None:
            sample["image"] = self.processor(self.image_root / conversation.image)
        return sample


@register_builder("llava_conversation")
class LlavaConversationBuilder:
    Config = LlavaConversationConfig
    metric = "caption"  # evaluation answers the last question after the rounds before it

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def sources(self, split: str) -> tuple[Path, Path]:
        """The split's annotation file and the folder its image names start in."""
        cfg = self.cfg
        if cfg.world is not None:
            root = prepare_storage(cfg, WorldImageSpec, write_world_conversations, "images")
            return root / "llava" / f"{split}.json", root
        if split not in cfg.annotations:
            raise ValueError(f"llava_conversation: 'annotations' names no {split!r} file (it names "
                             f"{sorted(cfg.annotations) or 'none'}); give annotations.{split}: a LLaVA JSON file")
        return resolve_path(cfg.annotations[split]), resolve_path(cfg.image_root)

    def build(self, split: str) -> LlavaConversationDataset:
        path, image_root = self.sources(split)
        conversations, dropped = read_conversations(path, self.cfg.on_bad_sample)
        dataset = LlavaConversationDataset(conversations[: self.cfg.max_samples], image_root,
                                           ImageProcessor(self.cfg.image_size), self.cfg.loss_on == "all_turns")
        return note_dropped(dataset, dropped, len(conversations) + len(dropped))
