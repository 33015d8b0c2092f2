"""The composite model: per modality a frozen encoder, a trainable interface and an adapter, and a frozen LLM.

A ``Batch`` holds one placeholder position per medium; ``splice`` widens each to as many positions as the
medium's interface emits (32 for a Q-Former, one per fired token for a C-Former) and fills them with the
adapter's outputs, so one prompt can hold several media of several kinds, or none, anywhere in a multi-turn
dialogue. ``forward(batch, objective)`` returns an objective's loss (``xllm.models.objectives``: the LLM's
answer loss, or a stage-1 interface's own), computed inside the model where DDP and FSDP see it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xllm.models import share
from xllm.models.llm.base import LLMBackend
from xllm.models.memory import dtype_of
from xllm.models.registry import OBJECTIVES
from xllm.models.trainable import set_train_mode
from xllm.processors.batch import ENCODED, IGNORE_INDEX, NO_MEDIUM, Batch, is_encoded
from xllm.processors.collator import CaptionTokens, Collator, marker

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    loss: torch.Tensor  # the mean over ``units``
    units: int  # what the loss averages over: answer tokens, image-text pairs, fired speech tokens
    logs: dict[str, float]  # the loss and its parts (itc, itm, itg; ce, quantity), as numbers
    # Each sample's summed loss and units (a mixture's per-task losses), when the batch names tasks.
    row_loss: torch.Tensor | None = None
    row_units: torch.Tensor | None = None


@dataclass
class LLMInputs:
    """A batch spliced for the LLM: placeholders widened to their media, left-padded again."""

    input_ids: torch.Tensor  # the pad id under media positions
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    media_positions: torch.Tensor  # [B, L'] bool: the positions media fill


class Modality(nn.Module):
    """Encoder -> interface -> adapter for one kind of input."""

    def __init__(self, encoder: nn.Module, interface: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.encoder, self.interface, self.adapter = encoder, interface, adapter

    def features(self, inputs: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's features and mask, cast to the interface's dtype (frozen parts may be stored in bf16,
        ``model.frozen_dtype``, while the interface trains in fp32). ``inputs`` are the encoder's (see
        ``encoded``), or its outputs read from a feature cache (``{"encoded", "mask"}``): then it does not run."""
        features, mask = (inputs[ENCODED], inputs["mask"]) if is_encoded(inputs) else self.encoded(inputs)
        return _cast(features, dtype_of(self.interface)), mask

    def encoded(self, inputs: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's own outputs, in its dtype (what a feature cache stores); ``inputs`` is a batch tensor or
        the encoder's keyword arguments (padded ``features`` and their ``lengths``), cast to its dtype."""
        encoder_dtype = dtype_of(self.encoder)
        if isinstance(inputs, dict):
            return self.encoder(**{k: _cast(v, encoder_dtype) for k, v in inputs.items()})
        return self.encoder(_cast(inputs, encoder_dtype))

    def forward(self, inputs: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One [length, llm_width] tensor per medium (lengths may differ, e.g. speech)."""
        out, out_mask = self.interface(*self.features(inputs))
        # A frozen interface (stage 3 trains the adapters alone) may be stored in bf16 beside an fp32 adapter.
        embeddings = self.adapter(_cast(out, dtype_of(self.adapter)))
        return [embeddings[i][out_mask[i]] for i in range(embeddings.shape[0])]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


class XLLM(nn.Module):
    def __init__(self, llm: LLMBackend | None, modalities: dict[str, Modality]) -> None:
        super().__init__()
        self.llm = llm
        # Three flat dicts so that state-dict keys read ``interfaces.image.*``, ``adapters.image.*``: the
        # trainable manifests and the checkpoint converters name modules this way.
        self.encoders = nn.ModuleDict({m: mod.encoder for m, mod in modalities.items()})
        self.interfaces = nn.ModuleDict({m: mod.interface for m, mod in modalities.items()})
        self.adapters = nn.ModuleDict({m: mod.adapter for m, mod in modalities.items()})
        self.every_modality_every_step = False  # see ``encode``
        # Parameter-free: an objective reads the model's parts, and the task names the one a stage optimises.
        self.objectives = nn.ModuleDict({name: OBJECTIVES.get(name)() for name in OBJECTIVES.names()})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def modality(self, name: str) -> Modality:
        return Modality(self.encoders[name], self.interfaces[name], self.adapters[name])

    def train(self, mode: bool = True) -> "XLLM":
        """Training mode for the modules that train only: a frozen LLM keeps its dropout off (and a Q-Former in
        training keeps its own on), whoever calls ``train()``: the runner, DDP or a notebook."""
        set_train_mode(self, mode)
        return self

    # ----------------------------------------------------------------- data

    def collator(self, with_answers: bool = True, pad_captions_to_max: bool = False) -> Collator:
        """The collator that lays out this model's batches (its modalities, its LLM's prompt layout, and a
        stage-1 interface's caption tokenizer)."""
        captions = None
        for interface in self.interfaces.values():
            if getattr(interface, "tokenizer", None) is not None:
                captions = CaptionTokens(interface.tokenizer, interface.max_text_length, pad_captions_to_max)
        layout = None if self.llm is None else self.llm.layout
        budget = None if self.llm is None else self.llm.max_answer_length
        return Collator(list(self.encoders), layout, with_answers, captions, budget)

    def make_batch(self, inputs: dict | Batch, with_answers: bool) -> Batch:
        """``inputs`` as a batch on the model's device; a dict is ``{"prompt": [...], "image": ..., ...}``."""
        batch = inputs if isinstance(inputs, Batch) else self.collator(with_answers).from_columns(inputs)
        return batch.to(self.device)

    # ----------------------------------------------------------------- media in the prompt

    def encode(self, batch: Batch) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor | float]:
        """Each medium of the batch through its modality, and a zero to add to the loss.

        With ``every_modality_every_step`` (set for training in several processes), a modality the batch lacks
        runs one dummy input, times zero: every rank then runs every module, in the same order, at every step,
        so DDP's gradient reduction and FSDP's all-gathers stay in step when one rank's batch is speech and
        another's images. The dummy pass draws from a forked RNG: the real stream is the same as without it.
        """
        unknown = sorted(set(batch.media) - set(self.encoders))
        if unknown:
            raise ValueError(f"the batch holds {', '.join(unknown)} media but the model has only "
                             f"{', '.join(self.encoders)}")
        media, idle = {}, 0.0
        for name in self.encoders:  # a fixed order: collectives pair up across ranks in call order
            if name in batch.media:
                media[name] = self.modality(name)(batch.media[name])
            elif self.every_modality_every_step and torch.is_grad_enabled():
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    out = self.modality(name)(self.encoders[name].dummy_input(self.device))
                idle = idle + 0.0 * sum(t.sum() for t in out)
        return media, idle

    def splice(self, batch: Batch, media: dict[str, list[torch.Tensor]]) -> LLMInputs:
        """The LLM's inputs: each placeholder widened to its medium's embeddings, rows left-padded again.

        Vectorised over the batch: every position gets a width (1 for a token, the medium's length for a
        placeholder, 0 for padding or a truncated token), and cumulative widths place it in the new row.
        """
        order = batch.placeholder_modalities()
        counts = Counter(order)
        for modality in set(counts) | set(media):
            if counts[modality] != len(media.get(modality, [])):
                raise ValueError(f"{len(media.get(modality, []))} {modality} inputs given but the batch holds "
                                 f"{counts[modality]} {marker(modality)} placeholders")
        cursor: Counter = Counter()
        pieces = []
        for modality in order:
            pieces.append(media[modality][cursor[modality]])
            cursor[modality] += 1
        is_slot = batch.media_slots != NO_MEDIUM
        widths = batch.attention_mask.long().clone()
        if pieces:
            widths[is_slot] = torch.tensor([p.shape[0] for p in pieces], device=widths.device)
        widths = self._fit_prompts(widths, batch.labels, is_slot, batch.ids)
        total = widths.sum(1)
        width = int(total.max())
        start = widths.cumsum(1) - widths + (width - total)[:, None]
        rows, columns = ((widths > 0) & ~is_slot).nonzero(as_tuple=True)
        placed = start[rows, columns]
        input_ids = torch.full((len(batch), width), self.llm.layout.pad_token_id, dtype=batch.input_ids.dtype,
                               device=widths.device)
        input_ids[rows, placed] = batch.input_ids[rows, columns]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[rows, placed] = batch.labels[rows, columns]
        attention_mask = (torch.arange(width, device=widths.device)[None, :] >= (width - total)[:, None]).long()
        embeds = self.llm.embed(input_ids)
        media_positions = torch.zeros_like(input_ids, dtype=torch.bool)
        if pieces:
            slot_rows, slot_columns = is_slot.nonzero(as_tuple=True)  # row-major: the order of ``pieces``
            lengths = widths[slot_rows, slot_columns]
            first = start[slot_rows, slot_columns].repeat_interleave(lengths)
            offsets = torch.arange(int(lengths.sum()), device=widths.device) - (
                lengths.cumsum(0) - lengths).repeat_interleave(lengths)
            target = (slot_rows.repeat_interleave(lengths), first + offsets)
            embeds = embeds.index_put(target, torch.cat(pieces).to(embeds.dtype))
            media_positions[target] = True
        return LLMInputs(input_ids, embeds, attention_mask, labels, media_positions)

    def _fit_prompts(self, widths: torch.Tensor, labels: torch.Tensor, is_slot: torch.Tensor,
                     ids: list[str]) -> torch.Tensor:
        """Rows whose prompt (text and media positions) exceeds ``llm.max_prompt_length``: an error, or
        (``llm.overflow: truncate``) their first tokens dropped, never a medium."""
        limit = self.llm.max_prompt_length
        if limit is None:
            return widths
        # The prompt is all before the final answer: up to a row's last unlabelled position (a whole generation
        # row), so a conversation's earlier answers, labelled too, count as the prompt they are.
        unlabelled = labels == IGNORE_INDEX
        last = labels.shape[1] - 1 - unlabelled.flip(1).int().argmax(1)
        lengths = (widths * (torch.arange(labels.shape[1], device=labels.device) <= last[:, None])).sum(1)
        for row in (lengths > limit).nonzero().flatten().tolist():
            length = int(lengths[row])
            if self.llm.overflow != "truncate":
                raise ValueError(f"sample {ids[row]!r}: a prompt of {length} positions exceeds "
                                 f"llm.max_prompt_length={limit} (set llm.overflow=truncate to keep its end instead)")
            excess = length - limit
            dropped = widths[row].cumsum(0) <= excess
            if int(widths[row][dropped].sum()) != excess or bool((dropped & is_slot[row]).any()):
                raise ValueError(f"sample {ids[row]!r}: truncating its {length}-position prompt to {limit} would "
                                 "cut a media span")
            widths[row, dropped] = 0
            log.warning("sample %r: prompt of %d positions truncated to its last %d (llm.max_prompt_length)",
                        ids[row], length, limit)
        return widths

    # ----------------------------------------------------------------- training and generation

    def forward(self, batch: Batch, objective: str = "lm") -> ModelOutput:
        """The loss of ``objective`` (a registered objective: ``lm``, ``qformer_pretrain``, ``cif_asr``)."""
        return self.objectives[objective](self, batch)

    @torch.no_grad()
    def generate(self, inputs: Batch | dict, objective: str = "lm", **kwargs) -> list[str]:
        """Text per sample: the LLM's answer (``lm``), or a stage-1 interface's own decoding (``cif_asr``).

        ``inputs`` may be ``{"prompt": [...], "image": <media in marker order>}``, as in a notebook."""
        return self.objectives[objective].predict(self, self.make_batch(inputs, with_answers=False), **kwargs)

    def stream(self, inputs: Batch | dict, **kwargs) -> Iterator[str]:
        """One sample's answer so far after every new token (a chat's streamed reply); ``inputs`` as in
        ``generate``."""
        return self.objectives["lm"].stream(self, self.make_batch(inputs, with_answers=False), **kwargs)

    # ----------------------------------------------------------------- sharing

    def save_pretrained(self, folder: str | Path, include_frozen: bool = False, card: dict | None = None) -> Path:
        """Writes the model as a folder ``from_pretrained`` and ``load_model`` read (``xllm.models.share``):
        ``xllm_config.json``, ``model.safetensors`` (the trained weights, or every weight with ``include_frozen``,
        which makes the folder loadable without the frozen parts' sources) and a ``README.md`` model card holding
        ``card``'s title, description, stages, datasets and figures."""
        return share.save_pretrained(self, folder, include_frozen, card)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, **overrides) -> "XLLM":
        """The model a ``save_pretrained`` folder (or a ``zoo:`` path or Hub id naming one) holds, in eval mode on
        ``device``, cast to ``dtype`` if given; ``overrides`` replace model config keys (``llm={...}``)."""
        return share.from_pretrained(name_or_path, device, dtype, **overrides)

    def require_llm(self) -> LLMBackend:
        if self.llm is None:
            raise ValueError("this model was built without an LLM (model.llm.backend: none); it serves objectives "
                             "that never read one, such as Q-Former pre-training")
        return self.llm
