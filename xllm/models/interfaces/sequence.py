"""A generic interface for numeric feature sequences [T, C]: a small transformer, then queries or per-step outputs.

Any modality whose encoder emits a feature sequence (device status, non-speech audio features, sensor logs)
reaches the LLM through this one class, configured by width and depth: with ``num_query_tokens > 0`` learned
queries read the sequence through cross-attention and the LLM sees that many positions per medium; with 0 it
sees one position per real step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xllm.models.registry import register_interface


@register_interface("sequence")
class SequenceInterface(nn.Module):
    @dataclass
    class Config:
        hidden_size: int = 128
        num_layers: int = 2
        num_heads: int = 4
        num_query_tokens: int = 8  # 0: one output per input step
        max_steps: int = 256  # rows of the step position table
        dropout: float = 0.0

    def __init__(self, input_dim: int, cfg) -> None:
        super().__init__()
        self.input_proj = nn.Linear(input_dim, cfg.hidden_size)
        self.step_position = nn.Embedding(cfg.max_steps, cfg.hidden_size)
        layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, 4 * cfg.hidden_size, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.num_query_tokens = cfg.num_query_tokens
        if cfg.num_query_tokens > 0:
            self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
            self.cross_attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout, batch_first=True)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.output_dim = cfg.hidden_size

    @classmethod
    def build(cls, cfg, input_dim: int) -> "SequenceInterface":
        return cls(input_dim, cfg)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, C] features and [B, T] mask -> [B, Q or T, H] outputs and their mask."""
        steps = features.shape[1]
        if steps > self.step_position.num_embeddings:
            raise ValueError(f"a sequence of {steps} steps exceeds the interface's max_steps="
                             f"{self.step_position.num_embeddings}")
        hidden = self.input_proj(features) + self.step_position.weight[:steps]
        hidden = self.encoder(hidden, src_key_padding_mask=~mask)
        if self.num_query_tokens == 0:
            return self.norm(hidden), mask
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out, _ = self.cross_attention(queries, hidden, hidden, key_padding_mask=~mask, need_weights=False)
        out = self.norm(out + queries)
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
