"""The mini tier's image encoder: a small ViT (``Blip2VisionModel`` layout) pre-trained contrastively against the
frozen all-MiniLM-L6-v2 sentence encoder.

No pretrained image encoder installs offline, so one is made here, CLIP-style: the ViT's mean token, projected,
must pick its own caption's MiniLM embedding out of the batch (and each caption its image). The pictures are the
synthetic world's scenes with their captions, and the photographs scikit-image ships with captions written for
them (``PHOTOS``); three photographs (astronaut, coffee, chelsea) are held out, so that the mini tier's captions
of them show what it makes of pictures it has never seen. The tiny tier's grid probe is added on the world's
scenes: a contrastive loss over sentence embeddings alone keeps little of where each shape lies, which a
captioner of the world needs. Projection, temperature and probe are discarded afterwards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoModel, AutoTokenizer, Blip2VisionConfig, Blip2VisionModel

from xllm.models.sources import model_folder
from xllm.processors.image import ImageProcessor
from xllm.world.render import RENDER_VERSION, render
from xllm.world.scenes import caption, sample_scene
from xllm.zoo.image_encoder import GridProbe, grid_labels
from xllm.zoo.loop import Schedule, StepLoss, train

TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# scikit-image's bundled photographs (``skimage.data.<name>``) and what they show.
PHOTOS = {
    "camera": "a black and white photograph of a man standing behind a camera on a tripod.",
    "coins": "a grey photograph of many old coins lying in rows.",
    "horse": "a black silhouette of a horse on a white background.",
    "moon": "a grey photograph of the surface of the moon with craters.",
    "page": "a scanned page of printed text.",
    "text": "a photograph of printed letters and words.",
    "clock": "a grey picture of a round clock on a wall.",
    "brick": "a grey photograph of a brick wall.",
    "grass": "a grey photograph of grass.",
    "gravel": "a grey photograph of small stones of gravel.",
    "logo": "a logo of a blue and green snake and the letters of a word.",
    "colorwheel": "a wheel of all the colours of the rainbow.",
    "rocket": "a photograph of a rocket on its launch pad under a blue sky.",
    "hubble_deep_field": "a photograph of many distant galaxies in black space.",
    "immunohistochemistry": "a microscope picture of stained cells in brown and blue.",
    "retina": "a photograph of the back of a human eye with red blood vessels.",
    "cell": "a grey microscope picture of a cell.",
    "checkerboard": "a black and white checkerboard.",
}
HELD_OUT = ("astronaut", "coffee", "chelsea")  # captioned by the mini tier, never seen in pre-training


@dataclass(frozen=True)
class MiniEncoderRecipe:
    seed: int = 0
    image_size: int = 96
    patch_size: int = 16
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    steps: int = 1000
    batch_size: int = 48
    photos_per_batch: int = 4
    lr: float = 5e-4
    probe_weight: float = 1.0
    render_version: int = RENDER_VERSION
    text_encoder: str = TEXT_ENCODER


def photo(name: str) -> Image.Image:
    """A scikit-image photograph as an RGB image."""
    from skimage import data  # the mini extra: only this builder and the captions demo read it

    pixels = np.asarray(getattr(data, name)())
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    image = Image.fromarray(pixels)
    return image.convert("RGB") if image.mode != "RGBA" else Image.alpha_composite(
        Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")


def random_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    """A square crop of 50-100 % of the shorter side, flipped half the time: many views of few photographs."""
    side = int(min(image.size) * rng.uniform(0.5, 1.0))
    left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
    crop = image.crop((left, top, left + side, top + side))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


class SentenceEncoder:
    """MiniLM's sentence embedding (mean over tokens, L2-normalised), frozen, memoised per caption: the world's
    grammar repeats its captions."""

    def __init__(self, spec: str) -> None:
        folder = model_folder(spec, "zoo mini image_encoder text_encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.embed = lru_cache(maxsize=100_000)(self._embed)

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        batch = self.tokenizer([text], return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state[0]
        return F.normalize(hidden.mean(0), dim=-1)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.embed(t) for t in texts])


def build_mini_image_encoder(folder: Path, recipe: MiniEncoderRecipe = MiniEncoderRecipe()) -> None:
    torch.manual_seed(recipe.seed)
    model = Blip2VisionModel(Blip2VisionConfig(
        image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size, initializer_range=0.02))
    text = SentenceEncoder(recipe.text_encoder)
    projection = nn.Linear(recipe.hidden_size, text.model.config.hidden_size)
    log_temperature = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    heads = nn.ParameterList([log_temperature])
    probe = GridProbe(recipe.hidden_size)
    processor = ImageProcessor(recipe.image_size)
    photos = {name: photo(name) for name in PHOTOS}
    rng = random.Random(f"mini-encoder/{recipe.seed}")
    world_count = recipe.batch_size - recipe.photos_per_batch

    def step_loss(step: int) -> StepLoss:
        scenes = [sample_scene(rng) for _ in range(world_count)]
        names = [rng.choice(sorted(photos)) for _ in range(recipe.photos_per_batch)]
        images = [render(s, recipe.image_size, rng) for s in scenes] + [random_crop(photos[n], rng) for n in names]
        captions = [caption(s, "en") for s in scenes] + [PHOTOS[n] for n in names]
        tokens = model(pixel_values=torch.stack([processor(image) for image in images])).last_hidden_state
        image_embeddings = F.normalize(projection(tokens.mean(1)), dim=-1)
        logits = image_embeddings @ text(captions).T * log_temperature.exp().clamp(max=100)
        # Identical captions in one batch (the same photograph twice) are each other's positives.
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        labels = torch.stack([grid_labels(s) for s in scenes])
        grid = probe(tokens[:world_count])
        probe_loss = sum(F.cross_entropy(l.flatten(0, 1), labels[..., i].flatten()) for i, l in enumerate(grid))
        accuracy = (logits.argmax(1) == torch.arange(len(captions))).float().mean().item()
        return contrastive + recipe.probe_weight * probe_loss, {"contrastive": contrastive.item(),
                                                                "image->text acc": accuracy}

    train("mini image encoder", [model, projection, heads, probe], recipe.steps, Schedule(recipe.lr, 100), step_loss,
          weight_decay=0.05)
    model.save_pretrained(folder)
