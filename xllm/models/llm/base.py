"""The one small interface every frozen LLM backend offers to the composite model.

The composite (``xllm.models.xllm.XLLM``) never looks inside an LLM. The backend's ``layout`` (a
``xllm.processors.collator.TextLayout``: chat formatting, tokenisation, prompt + answer with labels, decoding)
runs in the DataLoader workers; the backend itself embeds ids, runs on left-padded embeddings and generates.
Each backend derives its positions from the attention mask, so a left-padded row computes what it computes alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from xllm.processors.collator import TextLayout


@dataclass
class LLMOutput:
    """What ``LLMBackend.forward`` returns: the logits without labels, the answer loss with them."""

    logits: torch.Tensor | None = None  # [B, L, V], computed only when no labels are given
    loss: torch.Tensor | None = None  # the mean cross-entropy over the labelled tokens (the gradient flows here)
    row_loss: torch.Tensor | None = None  # [B] fp32: each row's summed loss, without gradient
    row_units: torch.Tensor | None = None  # [B]: each row's labelled tokens


class LLMBackend(nn.Module, ABC):
    """A frozen language model seen through layout / embed / forward / generate."""

    layout: TextLayout
    model: nn.Module  # the transformer, whose input embeddings ``embed`` looks ids up in
    hidden_size: int
    max_prompt_length: int | None = None  # prompt positions, media included, that a row may hold
    overflow: str = "refuse"  # a longer prompt: "refuse" (error) or "truncate" (keep its end)
    max_answer_length: int | None = None  # answer tokens (end token included) a training row keeps

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ids."""
        return self.model.get_input_embeddings()(input_ids)

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> LLMOutput:
        """Run the LLM on left-padded embeddings. Without labels: the logits of every position. With labels
        ([B, L], ``IGNORE_INDEX`` where no loss is read): the loss of each labelled token predicted from the
        position before it, computed at those positions only (``xllm.models.llm.label_loss``), no logits."""

    @abstractmethod
    def generate(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, **generation_kwargs) -> list[list[int]]:
        """New token ids per row (prompt excluded, stopped at the end token)."""

    @abstractmethod
    def stream(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               max_new_tokens: int, **generation_kwargs) -> Iterator[int]:
        """The new token ids of one row as they are generated, up to (not including) the end token."""

    def decode(self, ids: list[int]) -> str:
        return self.layout.decode(ids)
