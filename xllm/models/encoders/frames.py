"""Video encoder: every frame through another modality's image encoder (``shares: image``), frames kept apart.

X-LLM reads a video as frames seen by the image encoder it already has; sharing the module (not a copy) keeps
one set of weights, named ``encoders.image.*`` in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xllm.models.registry import register_encoder


@register_encoder("frames")
class FrameEncoder(nn.Module):
    @dataclass
    class Config:
        pass

    def __init__(self, image_encoder: nn.Module) -> None:
        super().__init__()
        self.image = image_encoder
        self.output_dim = image_encoder.output_dim

    @classmethod
    def build(cls, cfg, shared=None) -> "FrameEncoder":
        if shared is None:
            raise ValueError("the 'frames' encoder reads frames with another modality's image encoder: set "
                             "model.modalities.<video>.shares to that modality (e.g. shares: image)")
        return cls(shared.encoder)

    def dummy_input(self, device: torch.device) -> torch.Tensor:
        """A one-frame video of the image encoder's dummy image."""
        return self.image.dummy_input(device)[:, None]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, 3, H, W] frames -> features [B, T, tokens, D] and mask [B, T, tokens]."""
        if pixel_values.dim() != 5:
            raise ValueError(f"video input must be [batch, frames, 3, height, width], got {tuple(pixel_values.shape)}")
        batch, frames = pixel_values.shape[:2]
        features, mask = self.image(pixel_values.flatten(0, 1))
        return features.unflatten(0, (batch, frames)), mask.unflatten(0, (batch, frames))
