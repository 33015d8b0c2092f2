"""The tiny tier's image encoder: a small ViT in the ``Blip2VisionModel`` layout, pre-trained on the world's
images by a grid probe that is discarded afterwards."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from xllm.processors.image import ImageProcessor
from xllm.world.render import RENDER_VERSION, render
from xllm.world.scenes import COLOURS, KINDS, POSITIONS, SIZES, sample_scene
from xllm.zoo.loop import Schedule, StepLoss, train

WARMUP_STEPS = 100


@dataclass(frozen=True)
class TinyEncoderRecipe:
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    render_version: int = RENDER_VERSION  # a change in drawing means a new encoder


class GridProbe(nn.Module):
    """Reads each grid cell's shape (colour, kind, size, or empty) from the ViT's tokens.

    One learned attention query per cell pools the tokens, so the ViT must keep where each shape is as well as
    what it is: what a captioner needs from a frozen encoder. The probe is discarded after pre-training.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.pool = nn.Linear(width, len(POSITIONS))  # one query per grid cell
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.kind = nn.Linear(width, len(KINDS) + 1)
        self.size = nn.Linear(width, len(SIZES) + 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = self.pool(tokens).softmax(dim=1)  # [N, S, cells]
        cells = torch.einsum("nsc,nsd->ncd", weights, tokens)
        return self.colour(cells), self.kind(cells), self.size(cells)


def grid_labels(scene) -> torch.Tensor:
    """[cells, 3] class ids (colour, kind, size); 0 means the cell is empty."""
    labels = torch.zeros(len(POSITIONS), 3, dtype=torch.long)
    for shape in scene.shapes:
        labels[POSITIONS.index(shape.position)] = torch.tensor([COLOURS.index(shape.colour) + 1, KINDS.index(shape.kind) + 1,
                                     SIZES.index(shape.size) + 1])
    return labels


def build_image_encoder(folder: Path, recipe: TinyEncoderRecipe = TinyEncoderRecipe()) -> None:
    torch.manual_seed(recipe.seed)
    model = Blip2VisionModel(Blip2VisionConfig(
        image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size, initializer_range=0.02))
    probe = GridProbe(recipe.hidden_size)
    processor = ImageProcessor(recipe.image_size)
    rng = random.Random(f"encoder/{recipe.seed}")

    def step_loss(step: int) -> StepLoss:
        scenes = [sample_scene(rng) for _ in range(recipe.batch_size)]
        pixels = torch.stack([processor(render(s, recipe.image_size, rng)) for s in scenes])
        labels = torch.stack([grid_labels(s) for s in scenes])
        logits = probe(model(pixel_values=pixels).last_hidden_state)
        loss = sum(F.cross_entropy(l.flatten(0, 1), labels[..., i].flatten()) for i, l in enumerate(logits))
        accuracy = (logits[1].argmax(-1) == labels[..., 1]).float().mean().item()
        return loss, {"cell-kind acc": accuracy}

    train("tiny image encoder", [model, probe], recipe.steps, Schedule(recipe.lr, WARMUP_STEPS), step_loss,
          weight_decay=0.05)
    model.save_pretrained(folder)
