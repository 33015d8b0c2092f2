"""The world's splits: their names, their sizes in a spec, and drawing items that no other split holds."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

SPLITS = ("train", "val", "test")
T = TypeVar("T", bound=Hashable)


def split_size(spec, split: str) -> int:
    """``spec.num_<split>``."""
    return getattr(spec, f"num_{split}")


def unique_draws(spec, salt: str, sample: Callable[[random.Random], T]) -> Iterator[tuple[str, int, T, random.Random]]:
    """(split, index, item, rng) for every item of every split, each split drawn from its own seeded stream
    (``salt`` + the split's index) and no item in two splits: a test scene never occurs in training. The caller
    may draw more from ``rng`` for the item before the next one is sampled."""
    seen: set[T] = set()
    for split_index, split in enumerate(SPLITS):
        rng = random.Random(f"{salt}{split_index}")
        index = 0
        while index < split_size(spec, split):
            item = sample(rng)
            if item in seen:
                continue
            seen.add(item)
            yield split, index, item, rng
            index += 1
