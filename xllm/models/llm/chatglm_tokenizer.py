"""ChatGLM-6B tokenizer (``ice_text.model``), its prefix-LM layout and its chat text conventions.

The SentencePiece model cannot see newlines, tabs or runs of spaces (its normaliser folds whitespace), so the
text is rewritten first: "\\n" -> ``<n>``, "\\t" -> ``<|tab|>``, a run of k spaces (2 <= k <= 80) ->
``<|blank_k|>``. Decoding undoes that. The normaliser is NFKC, so full-width punctuation comes back as ASCII.

SentencePiece never matches control pieces in its input, so the original tokenizer splits the text at its
registered special tokens first (``SPECIAL_PIECES_IN_TEXT``); this one does the same, so "<sop>" in a text
becomes the id of <sop> while "[gMASK]" stays ordinary text, as there.

A GLM sequence is ``context [gMASK] <sop> continuation``: the context (up to ``<sop>``) attends
bidirectionally, ``<sop>`` and what follows attend causally, and positions are two-dimensional (position id,
block position id). ``prefix_lm_layout`` builds that mask and those positions for left-padded batches; the
model uses the same function when it has to build them itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm
import torch

MAX_BLANK_LENGTH = 80
_BLANK_RUN = re.compile(" {2,}")
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")
_CJK = "[\u4e00-\u9fff]"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
# The special tokens of the original's tokenizer_config (bos, eos, unk, pad, mask): transformers (4.27, the
# version it runs on) splits the text at these, and only these, before SentencePiece and strips the whitespace
# on both sides of each. The ids are looked up by name: other vocabularies hold the same pieces at other ids.
SPECIAL_PIECES_IN_TEXT = ("<sop>", "<eop>", "<unk>", "<pad>", "[MASK]")
# A capturing group makes re.split alternate text, special piece, text, ...
_SPECIAL_PIECE = re.compile("(" + "|".join(map(re.escape, SPECIAL_PIECES_IN_TEXT)) + ")")


def _blank_token(length: int) -> str:
    return f"<|blank_{length}|>"


def _encode_blank_run(match: re.Match) -> str:
    # Longest tokens first, as the original replaces runs of 80 spaces before shorter ones; a single space
    # left over stays a space.
    full, rest = divmod(len(match.group()), MAX_BLANK_LENGTH)
    tail = _blank_token(rest) if rest >= 2 else " " * rest
    return _blank_token(MAX_BLANK_LENGTH) * full + tail


def prefix_lm_layout(input_ids: torch.Tensor, padding_mask: torch.Tensor | None, *, mask_token_id: int,
                     gmask_token_id: int, bos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask ``[b, 1, L, L]`` (bool, True = blocked) and 2D position ids ``[b, 2, L]`` of GLM rows.

    ``padding_mask`` ([b, L], 1 = real token, 0 = left pad) may be None for unpadded rows. Every row is laid
    out as if it were alone: pad rows and columns are blocked, pads get position 0, and the mask position is
    counted within the unpadded row.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    column = torch.arange(length, device=device)
    if padding_mask is None:
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        real = padding_mask.to(device=device, dtype=torch.bool)
    num_pads = length - real.sum(1, keepdim=True)
    if not torch.equal(real, column >= num_pads):
        raise ValueError("attention_mask must be left padding: zeros (pads) first, then ones (tokens) in every row")
    is_bos = (input_ids == bos_token_id) & real
    is_gmask = (input_ids == gmask_token_id) & real
    is_mask = (input_ids == mask_token_id) & real
    rows_without_bos = (~is_bos.any(1)).nonzero().flatten().tolist()
    if rows_without_bos:
        raise ValueError(f"rows {rows_without_bos} hold no <sop> (id {bos_token_id}); a GLM prompt ends with "
                         "[gMASK] <sop>")
    rows_without_mask = (~(is_gmask.any(1) | is_mask.any(1))).nonzero().flatten().tolist()
    if rows_without_mask:
        raise ValueError(f"rows {rows_without_mask} hold neither [gMASK] (id {gmask_token_id}) nor [MASK] "
                         f"(id {mask_token_id})")
    # argmax of a 0/1 row is its first 1
    context_length = is_bos.int().argmax(1, keepdim=True)
    mask_position = torch.where(is_gmask.any(1), is_gmask.int().argmax(1), is_mask.int().argmax(1))[:, None]

    in_context = column < context_length  # [b, L]
    sees = in_context[:, None, :] | (column[None, None, :] <= column[None, :, None])
    sees = sees & real[:, :, None] & real[:, None, :]
    positions = torch.where(in_context, column - num_pads, mask_position - num_pads)
    positions = torch.where(real, positions, 0)
    block_positions = torch.where(in_context, 0, column - context_length + 1)
    return ~sees[:, None], torch.stack((positions, block_positions), dim=1)


def build_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
    """ChatGLM-6B's chat prompt: the query verbatim without history, else ``[Round i]`` rounds."""
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return rounds + f"[Round {len(history)}]\n问：{query}\n答："


def clean_response(text: str) -> str:
    """ChatGLM-6B's response post-processing: ASCII punctuation next to Chinese becomes full-width."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(f"({_CJK}){mark}", rf"\g<1>{full_width}", text)
        text = re.sub(f"{mark}({_CJK})", rf"{full_width}\g<1>", text)
    return text


class ChatGLMTokenizer:
    """SentencePiece tokenizer of ChatGLM-6B; token id = SentencePiece id (the slim vocabulary)."""

    def __init__(self, model_file: str | Path) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"ChatGLM tokenizer model not found: {model_file}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.unk_token_id = self._piece_id("<unk>")
        self.pad_token_id = self._piece_id("<pad>")
        self.end_token_id = self._piece_id("</s>")
        self.mask_token_id = self._piece_id("[MASK]")
        self.gmask_token_id = self._piece_id("[gMASK]")
        self.bos_token_id = self._piece_id("<sop>")
        self.eos_token_id = self._piece_id("<eop>")
        self.special_piece_ids = {piece: self._piece_id(piece) for piece in SPECIAL_PIECES_IN_TEXT}

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ChatGLMTokenizer":
        """The tokenizer of a checkpoint folder (``ice_text.model``, optionally ``tokenizer_config.json``)."""
        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            # Pre-slim checkpoints shifted every id by 20000 image tokens; the released one sets 0.
            unsupported = {
                key: config[key]
                for key, supported in (("num_image_tokens", 0), ("remove_space", False), ("do_lower_case", False))
                if config.get(key, supported) != supported
            }
            if unsupported:
                raise NotImplementedError(f"{config_file}: unsupported tokenizer settings {unsupported}")
        return cls(folder / "ice_text.model")

    def _piece_id(self, piece: str) -> int:
        token_id = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(token_id) != piece:
            raise ValueError(f"{self.model_file} has no piece {piece!r}; is it ChatGLM-6B's ice_text.model?")
        return token_id

    # ------------------------------------------------------------------ text <-> ids

    def preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return _BLANK_RUN.sub(_encode_blank_run, text)

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added; the ``SPECIAL_PIECES_IN_TEXT`` in it become their ids."""
        parts = _SPECIAL_PIECE.split(text)
        ids = []
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self.special_piece_ids[part])
                continue
            # Whitespace next to a special piece goes (str.strip, newlines and tabs included), as in the original.
            if index > 0:
                part = part.lstrip()
            if index < len(parts) - 1:
                part = part.rstrip()
            if part:
                # Each piece of text is encoded on its own, so each gets SentencePiece's dummy prefix.
                ids += self.sp.encode(self.preprocess(part))
        return ids

    def build_inputs_with_special_tokens(self, ids: list[int], pair_ids: list[int] | None = None) -> list[int]:
        """``ids [gMASK] <sop>``, or ``ids [gMASK] <sop> pair_ids <eop>`` for a pair."""
        ids = ids + [self.gmask_token_id, self.bos_token_id]
        if pair_ids is not None:
            ids = ids + pair_ids + [self.eos_token_id]
        return ids

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenize(text)
        pair_ids = None if text_pair is None else self.tokenize(text_pair)
        if not add_special_tokens:
            return ids if pair_ids is None else ids + pair_ids
        return self.build_inputs_with_special_tokens(ids, pair_ids)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of ``ids``; pads and control tokens ([gMASK], <sop>, <eop>, ...) vanish."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [i for i in ids if i != self.pad_token_id]
        out_of_range = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if out_of_range:
            raise ValueError(f"ids {out_of_range[:10]} are outside the tokenizer's {self.vocab_size} pieces "
                             "(rows past it in the embedding are padding)")
        text = self.sp.decode(ids)
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_TOKEN.sub(lambda m: " " * int(m.group(1)), text)

    # ------------------------------------------------------------------ batches

    def batch_encode(self, texts: list[str], padding: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` [b, L]; with ``padding`` also the prefix-LM ``attention_mask``
        [b, 1, L, L] (bool, True = blocked) and ``position_ids`` [b, 2, L], as the original pads."""
        rows = [self.encode(text) for text in texts]
        width = max(len(row) for row in rows)
        if not padding:
            if any(len(row) != width for row in rows):
                raise ValueError("texts of different lengths need padding=True")
            return {"input_ids": torch.tensor(rows)}
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(row)) + row for row in rows])
        padding_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        attention_mask, position_ids = prefix_lm_layout(
            input_ids, padding_mask, mask_token_id=self.mask_token_id, gmask_token_id=self.gmask_token_id,
            bos_token_id=self.bos_token_id,
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def __call__(self, text: str | list[str], padding: bool = False) -> dict[str, torch.Tensor]:
        return self.batch_encode([text] if isinstance(text, str) else text, padding=padding)
