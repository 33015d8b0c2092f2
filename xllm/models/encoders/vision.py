"""Image encoder: a ViT in transformers' ``Blip2VisionModel`` layout (EVA ViT-g in the paper tier).

The model's ``post_layernorm`` plays BLIP-2's ``ln_vision``. LAVIS computes that norm with eps 1e-5 while
transformers shares the blocks' 1e-6, so ``ln_vision_eps`` says which convention a checkpoint was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from xllm.common.checkpoint import weights_elsewhere
from xllm.common.config import path_field
from xllm.common.paths import resolve_path, zoo_hint
from xllm.models.registry import register_encoder


@register_encoder("blip2_vision")
class VisionEncoder(nn.Module):
    @dataclass
    class Config:
        path: str | None = path_field("folder", default=None)  # a save_pretrained folder (``zoo:tiny/image_encoder``); None builds from the sizes
        image_size: int = 224
        patch_size: int = 14
        hidden_size: int = 1408
        num_hidden_layers: int = 39
        num_attention_heads: int = 16
        intermediate_size: int = 6144
        ln_vision_eps: float | None = None  # None keeps the checkpoint's layer_norm_eps

    def __init__(self, model: Blip2VisionModel, ln_vision_eps: float | None = None) -> None:
        super().__init__()
        self.model = model
        if ln_vision_eps is not None:
            self.model.post_layernorm.eps = ln_vision_eps
        self.output_dim = model.config.hidden_size
        self.image_size = model.config.image_size

    @classmethod
    def build(cls, cfg) -> "VisionEncoder":
        if cfg.path:
            folder = resolve_path(cfg.path)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"image encoder folder {folder} has no config.json{zoo_hint(cfg.path)}")
            model = (Blip2VisionModel(Blip2VisionConfig.from_pretrained(folder)) if weights_elsewhere(folder)
                     else Blip2VisionModel.from_pretrained(folder))
        else:
            model = Blip2VisionModel(Blip2VisionConfig(
                image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size))
        return cls(model, cfg.ln_vision_eps)

    def dummy_input(self, device: torch.device) -> torch.Tensor:
        """One black image: what a rank runs when its batch has none (``XLLM.encode``)."""
        return torch.zeros(1, 3, self.image_size, self.image_size, device=device)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised patch features [N, 1 + patches, D] and an all-true mask (every token is real)."""
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
