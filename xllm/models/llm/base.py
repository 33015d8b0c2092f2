"""The one small interface every frozen LLM backend offers to the composite model.

The composite (``xllm.models.xllm.XLLM``) never looks inside an LLM: it asks the backend to format a
conversation as prompt text, to tokenize text pieces, and to lay out prompt + answer as one id sequence with
labels. Media slots travel through that layout as ``MEDIA_SLOT`` ids, which the composite later fills with
interface outputs. Sequences are left-padded for training and generation alike, so one batch layout serves
both, and each backend derives its own positions from the attention mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

MEDIA_SLOT = -1  # id of a prompt position that an interface output replaces; never looked up in an embedding
IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, media, padding)


class LLMBackend(nn.Module, ABC):
    """A frozen language model seen through tokenize / layout / embed / forward / generate."""

    hidden_size: int
    pad_token_id: int

    @abstractmethod
    def format_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The prompt text for ``query`` after earlier (query, answer) rounds; media markers stay verbatim."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of a piece of text, with no special tokens added."""

    @abstractmethod
    def build_sequence(self, prompt_ids: list[int], answer: str | None) -> tuple[list[int], list[int]]:
        """Ids and labels of prompt + answer (+ end token). ``answer=None`` lays out a generation prompt.

        ``prompt_ids`` may hold ``MEDIA_SLOT`` entries; they must come back in the same order.
        Labels are ``IGNORE_INDEX`` everywhere except on the answer and its end token.
        """

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens removed."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ids (no ``MEDIA_SLOT`` among them)."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        """Run the LLM on left-padded embeddings; returns an object with ``.loss`` (if labels) and ``.logits``."""

    @abstractmethod
    def generate(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        **generation_kwargs,
    ) -> list[list[int]]:
        """New token ids per row (prompt excluded, stopped at the end token)."""
