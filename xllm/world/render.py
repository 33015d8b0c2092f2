"""Draws a scene as an RGB image; small jitter in place, colour and background keeps images from repeating."""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from xllm.world.scenes import POSITIONS, Scene, Shape

RGB = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (235, 215, 40), "purple": (160, 60, 200), "cyan": (40, 210, 220),
}
SIZE_FRACTION = {"small": 0.28, "large": 0.45}  # radius as a fraction of a grid cell
# Part of every world spec, so that folders drawn by an older version of this file are drawn again.
RENDER_VERSION = 2


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of the polygonal kinds; None for the circle, which PIL draws as an ellipse."""
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if kind == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    if kind == "star":  # ten vertices from the top, alternately at the full and at 0.45 of the radius
        spokes = [(r if i % 2 == 0 else r * 0.45, -math.pi / 2 + i * math.pi / 5) for i in range(10)]
        return [(cx + radius * math.cos(angle), cy + radius * math.sin(angle)) for radius, angle in spokes]
    if kind == "circle":
        return None
    raise ValueError(f"unknown shape kind {kind!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float, cell: float, rng: random.Random) -> None:
    r = SIZE_FRACTION[shape.size] * cell
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in RGB[shape.colour])
    polygon = shape_polygon(shape.kind, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(polygon, fill=colour)


def cell_center(position: str, size: int) -> tuple[float, float]:
    index = POSITIONS.index(position)
    cell = size / 3
    return (index % 3 + 0.5) * cell, (index // 3 + 0.5) * cell


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    shade = rng.randint(25, 60)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for shape in scene.shapes:
        cx, cy = cell_center(shape.position, size)
        jitter = 0.08 * cell
        draw_shape(draw, shape, cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter), cell, rng)
    return image
