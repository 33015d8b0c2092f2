"""Image preprocessing: RGB, bicubic resize to the encoder's size, scale to [0, 1], normalise per channel.

Written with PIL and torch rather than torchvision because torchvision is pinned to a different torch build
than the CPU one this library supports; the arithmetic is the same as BLIP-2's eval transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from xllm.processors.registry import register_processor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as the RGB pixels a viewer shows: turned as its EXIF orientation says, 16-bit and
    palette images brought to 8-bit RGB, transparency laid over white. A missing, unreadable or truncated file,
    or one with more pixels than PIL's decompression-bomb limit, raises an error naming it."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return as_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"image file {path} refused: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL reports some corrupt headers as SyntaxError
        raise ValueError(f"cannot read image file {path}: {error}") from None


def as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's own conversion clips 16-bit values at 255; a viewer scales them down.
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or wide.max() > 255 else 255.0
        image = Image.fromarray(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@register_processor("image")
class ImageProcessor:
    @dataclass
    class Config:
        image_size: int = 224
        mean: list[float] | None = None
        std: list[float] | None = None

    def __init__(self, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean or CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(std or CLIP_STD).view(3, 1, 1)

    def settings(self) -> dict:
        """What the pixels depend on (a feature cache records it)."""
        return {"image_size": self.image_size, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        """A [3, size, size] float tensor from a PIL image or an image file."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        # Resizing to the size an image has already gives it back unchanged.
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std
