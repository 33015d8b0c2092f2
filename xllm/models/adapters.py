"""Adapters: project an interface's outputs to the LLM's embedding width, one per modality."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from xllm.models.registry import register_adapter


@register_adapter("linear")
class LinearAdapter(nn.Linear):
    """X-LLM's adapter (``opt_proj``/``video_proj``): one linear map, keys ``weight`` and ``bias``."""

    @dataclass
    class Config:
        pass

    @classmethod
    def build(cls, cfg, input_dim: int, output_dim: int) -> "LinearAdapter":
        return cls(input_dim, output_dim)


@register_adapter("mlp")
class MLPAdapter(nn.Sequential):
    """Two linear maps with a GELU between them (LLaVA-1.5's projector)."""

    @dataclass
    class Config:
        hidden_dim: int | None = None  # None: the LLM's width

    @classmethod
    def build(cls, cfg, input_dim: int, output_dim: int) -> "MLPAdapter":
        hidden = cfg.hidden_dim or output_dim
        return cls(nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, output_dim))
