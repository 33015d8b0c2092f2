"""Motion clips of the synthetic world: one shape crosses the 3x3 grid in a direction, maybe past a still one.

Pure Python and deterministic given a ``random.Random``; ``videos.py`` renders and encodes the frames. The
caption names what moves and where to ("the red circle moves to the right."), in a fixed grammar that
``parse_motion`` reads back, so an evaluation can score the direction of a generated caption.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from xllm.world.scenes import COLOUR_ZH, COLOURS, KIND_ZH, KINDS, POSITIONS, SIZES, Shape

DIRECTIONS = ("left", "right", "up", "down")
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (column, row) per cell moved
DIRECTION_EN = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
DIRECTION_ZH = {"left": "向左", "right": "向右", "up": "向上", "down": "向下"}


@dataclass(frozen=True)
class Motion:
    mover: Shape  # ``mover.position`` is where it starts
    direction: str
    cells: int  # how far it travels
    still: tuple[Shape, ...]  # shapes that stay put; never the mover's colour and kind

    @property
    def end(self) -> str:
        return shift(self.mover.position, self.direction, self.cells)

    def to_dict(self) -> dict:
        return {"mover": asdict(self.mover), "direction": self.direction, "cells": self.cells,
                "still": [asdict(s) for s in self.still]}

    @classmethod
    def from_dict(cls, data: dict) -> "Motion":
        return cls(Shape(**data["mover"]), data["direction"], data["cells"], tuple(Shape(**s) for s in data["still"]))


def _target(position: str, direction: str, cells: int) -> str | None:
    """The cell ``cells`` steps from ``position`` in ``direction``; None off the grid."""
    index = POSITIONS.index(position)
    column, row = index % 3 + STEP[direction][0] * cells, index // 3 + STEP[direction][1] * cells
    return POSITIONS[row * 3 + column] if 0 <= column < 3 and 0 <= row < 3 else None


def shift(position: str, direction: str, cells: int) -> str:
    end = _target(position, direction, cells)
    if end is None:
        raise ValueError(f"moving {cells} cell(s) {direction} from {position!r} leaves the grid")
    return end


def sample_motion(rng: random.Random, max_still: int = 1) -> Motion:
    direction = rng.choice(DIRECTIONS)
    cells = rng.choice((1, 2))
    starts = [p for p in POSITIONS if _target(p, direction, cells) is not None]
    mover = Shape(rng.choice(KINDS), rng.choice(COLOURS), rng.choice(SIZES), rng.choice(starts))
    path = {shift(mover.position, direction, c) for c in range(cells + 1)}
    free = [p for p in POSITIONS if p not in path]
    still = []
    for position in sorted(rng.sample(free, rng.randint(0, max_still)), key=POSITIONS.index):
        kind, colour = rng.choice(KINDS), rng.choice(COLOURS)
        while (kind, colour) == (mover.kind, mover.colour):  # the caption's "the red circle" must be unique
            kind, colour = rng.choice(KINDS), rng.choice(COLOURS)
        still.append(Shape(kind, colour, rng.choice(SIZES), position))
    return Motion(mover, direction, cells, tuple(still))


def motion_caption_en(motion: Motion) -> str:
    return f"the {motion.mover.colour} {motion.mover.kind} moves {DIRECTION_EN[motion.direction]}."


def motion_caption_zh(motion: Motion) -> str:
    return f"{COLOUR_ZH[motion.mover.colour]}{KIND_ZH[motion.mover.kind]}{DIRECTION_ZH[motion.direction]}移动。"


_MOTION_EN = re.compile(
    f"(?P<colour>{'|'.join(COLOURS)}) (?P<kind>{'|'.join(KINDS)}) moves "
    f"(?P<direction>{'|'.join(sorted(DIRECTION_EN.values(), key=len, reverse=True))})")
_MOTION_ZH = re.compile(
    f"(?P<colour>{'|'.join(COLOUR_ZH.values())})(?P<kind>{'|'.join(KIND_ZH.values())})"
    f"(?P<direction>{'|'.join(DIRECTION_ZH.values())})移动")
# Per language: the grammar, the text it reads (English lower-cased) and the English words of its phrases.
_GRAMMARS = {"en": (_MOTION_EN, str.lower, {v: k for k, v in DIRECTION_EN.items()}),
             "zh": (_MOTION_ZH, str, {zh: en for table in (COLOUR_ZH, KIND_ZH, DIRECTION_ZH)
                                      for en, zh in table.items()})}


def parse_motion(text: str, lang: str = "en") -> tuple[str, str, str] | None:
    """(colour, kind, direction) of the first motion a caption states, or None when none follows the grammar."""
    if lang not in _GRAMMARS:
        raise ValueError(f"unknown caption language {lang!r}; known: en, zh")
    grammar, read, english = _GRAMMARS[lang]
    found = grammar.search(read(text))
    return None if found is None else tuple(english.get(found[k], found[k]) for k in ("colour", "kind", "direction"))


def motion_report(references: list[str], hypotheses: list[str], lang: str = "en") -> dict[str, float]:
    """Share of clips whose generated caption states the right direction, colour and kind (unparsable: wrong)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    scores = {"direction": 0, "colour": 0, "kind": 0}
    for ref, hyp in zip(references, hypotheses):
        truth, guess = parse_motion(ref, lang), parse_motion(hyp or "", lang)
        if truth is None:
            raise ValueError(f"reference caption {ref!r} does not follow the motion grammar")
        for name, said, right in zip(("colour", "kind", "direction"), guess or (), truth):
            scores[name] += said == right
    count = max(len(references), 1)
    return {f"accuracy_{k}": v / count for k, v in scores.items()}
