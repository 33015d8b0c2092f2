"""Q-Former interface (BLIP-2): learned queries read the frozen encoder's features through cross-attention.

The transformer is transformers' ``Blip2QFormerModel`` (the BLIP-2 query path: LayerNorm on the queries, self-
attention every layer, cross-attention every ``cross_attention_frequency`` layers), so BLIP-2 weights load by
name (``xllm.models.converters.blip2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from xllm.models.registry import register_interface


@register_interface("qformer")
class QFormerInterface(nn.Module):
    @dataclass
    class Config:
        num_query_tokens: int = 32
        hidden_size: int = 768
        num_hidden_layers: int = 12
        num_attention_heads: int = 12
        intermediate_size: int = 3072
        cross_attention_frequency: int = 2
        dropout: float = 0.1

    def __init__(self, config: Blip2QFormerConfig, num_query_tokens: int) -> None:
        super().__init__()
        self.qformer = Blip2QFormerModel(config)
        # BLIP-2 initialises the queries like BERT's embeddings.
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range)
        self.output_dim = config.hidden_size

    @staticmethod
    def qformer_config(cfg, input_dim: int, **extra) -> Blip2QFormerConfig:
        """The transformer's config from the interface options; ``extra`` adds fields (e.g. the text branch's)."""
        return Blip2QFormerConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
            cross_attention_frequency=cfg.cross_attention_frequency, encoder_hidden_size=input_dim,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, **extra)

    @classmethod
    def build(cls, cfg, input_dim: int) -> "QFormerInterface":
        return cls(cls.qformer_config(cfg, input_dim), cfg.num_query_tokens)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query outputs [N, Q, H] and their mask (all true: every query is always present)."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features,
                           encoder_attention_mask=mask.long()).last_hidden_state
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
