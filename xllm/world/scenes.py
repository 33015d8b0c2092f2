"""Scenes of the synthetic world: 1-3 coloured shapes on a 3x3 grid, with captions that can be parsed back.

Everything here is pure Python and deterministic given a ``random.Random``; rendering lives in ``render.py``.
Captions have a fixed grammar so that an evaluation can parse a generated caption into attributes and score
each attribute separately.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

KINDS = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
# Grid cells in reading order; index = row * 3 + column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ATTRIBUTES = ("kind", "colour", "size", "position")

POSITION_PHRASE_EN = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
KIND_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形", "cross": "十字", "star": "星形"}
COLOUR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "cyan": "青色"}
SIZE_ZH = {"small": "小", "large": "大"}
POSITION_ZH = {
    "top left": "左上角", "top": "上方", "top right": "右上角", "left": "左侧", "center": "中间",
    "right": "右侧", "bottom left": "左下角", "bottom": "下方", "bottom right": "右下角",
}
NUMBER_EN = {1: "one", 2: "two", 3: "three"}
NUMBER_ZH = {1: "一", 2: "两", 3: "三"}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # sorted by grid cell, so a scene has one canonical caption

    def to_dict(self) -> dict:
        return {"shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(tuple(Shape(**s) for s in data["shapes"]))


def sample_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    count = rng.randint(1, max_shapes)
    cells = sorted(rng.sample(range(len(POSITIONS)), count))
    return Scene(tuple(Shape(rng.choice(KINDS), rng.choice(COLOURS), rng.choice(SIZES), POSITIONS[cell])
                       for cell in cells))


def caption_en(scene: Scene) -> str:
    parts = [f"a {s.size} {s.colour} {s.kind} {POSITION_PHRASE_EN[s.position]}" for s in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def caption_zh(scene: Scene) -> str:
    parts = [f"{POSITION_ZH[s.position]}有一个{SIZE_ZH[s.size]}的{COLOUR_ZH[s.colour]}{KIND_ZH[s.kind]}" for s in scene.shapes]
    return "，".join(parts) + "。"


def caption(scene: Scene, lang: str) -> str:
    """The scene's caption in ``lang`` (en or zh)."""
    if lang == "en":
        return caption_en(scene)
    if lang == "zh":
        return caption_zh(scene)
    raise ValueError(f"unknown caption language {lang!r}; known: en, zh")


def _alternatives(table: dict[str, str]) -> str:
    return "|".join(sorted(table.values(), key=len, reverse=True))


_SHAPE_EN = re.compile(f"(?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<kind>{'|'.join(KINDS)}) "
                       f"(?P<position>{_alternatives(POSITION_PHRASE_EN)})")
_SHAPE_ZH = re.compile(f"(?P<position>{_alternatives(POSITION_ZH)})有一个(?P<size>{_alternatives(SIZE_ZH)})的"
                       f"(?P<colour>{_alternatives(COLOUR_ZH)})(?P<kind>{_alternatives(KIND_ZH)})")
# Per language: the grammar, the text it reads (English lower-cased) and the English words of its phrases.
_GRAMMARS = {"en": (_SHAPE_EN, str.lower, {v: k for k, v in POSITION_PHRASE_EN.items()}),
             "zh": (_SHAPE_ZH, str, {zh: en for table in (KIND_ZH, COLOUR_ZH, SIZE_ZH, POSITION_ZH)
                                     for en, zh in table.items()})}


def parse_caption(text: str, lang: str = "en") -> list[Shape]:
    """Shapes a caption mentions, in order; fragments that do not follow the grammar are ignored."""
    if lang not in _GRAMMARS:
        raise ValueError(f"unknown caption language {lang!r}; known: en, zh")
    grammar, read, english = _GRAMMARS[lang]
    return [Shape(*(english.get(m[name], m[name]) for name in ATTRIBUTES)) for m in grammar.finditer(read(text))]


def question_answers(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """A few English question-answer pairs whose answers follow from the scene alone."""
    qa = [("How many shapes are there?", NUMBER_EN[len(scene.shapes)] + ".")]
    target = rng.choice(scene.shapes)
    qa.append((f"What is {POSITION_PHRASE_EN[target.position]}?", f"a {target.size} {target.colour} {target.kind}."))
    kinds = [s.kind for s in scene.shapes]
    if kinds.count(target.kind) == 1:
        qa.append((f"What colour is the {target.kind}?", f"{target.colour}."))
    colour, kind = rng.choice(COLOURS), rng.choice(KINDS)
    present = any(s.colour == colour and s.kind == kind for s in scene.shapes)
    qa.append((f"Is there a {colour} {kind}?", "yes." if present else "no."))
    return qa
