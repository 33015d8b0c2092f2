"""Signal encoder: numeric feature sequences (device status, sensor logs) passed through unchanged.

A signal arrives channels-first, [B, C, T] (the layout the generic collate pads along time), and leaves as
[B, T, C] with a mask of the real steps; there is nothing to pre-train, so the encoder holds no weights and
only checks the channel count, which a wrong dataset would otherwise break deep inside the interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xllm.models.registry import register_encoder


@register_encoder("signal")
class SignalEncoder(nn.Module):
    @dataclass
    class Config:
        channels: int = 4

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.output_dim = channels

    @classmethod
    def build(cls, cfg) -> "SignalEncoder":
        return cls(cfg.channels)

    def dummy_input(self, device: torch.device) -> dict[str, torch.Tensor]:
        """One all-zero step."""
        return {"features": torch.zeros(1, self.output_dim, 1, device=device),
                "lengths": torch.ones(1, dtype=torch.long, device=device)}

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3 or features.shape[1] != self.output_dim:
            raise ValueError(f"signal input must be [batch, {self.output_dim} channels, steps], "
                             f"got {tuple(features.shape)}")
        steps = features.shape[-1]
        if lengths is None:
            mask = torch.ones(features.shape[0], steps, dtype=torch.bool, device=features.device)
        else:
            mask = torch.arange(steps, device=features.device)[None, :] < lengths.to(features.device)[:, None]
        return features.transpose(1, 2), mask
