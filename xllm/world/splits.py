"""The world's splits: their names, their sizes in a spec, drawing items that no other split holds, and writing
them to disk."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from xllm.common.paths import is_current, mark_current

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
T = TypeVar("T", bound=Hashable)


def split_size(spec, split: str) -> int:
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


def write_splits(spec, root: str | Path, what: str, generate: Callable[[Any], dict[str, list[dict]]],
                 write_files: Callable[[Path, str, list[dict]], None] | None = None, **json_options: Any) -> None:
    """Writes each split's records, ``generate(spec)``, to ``root/annotations/{split}.json``, after
    ``write_files(root, split, rows)`` has written their media; a ``world.json`` marker written last says the
    folder is complete, and a complete folder of the same spec is left as it is."""
    root = Path(root)
    marker = root / "world.json"
    if is_current(marker, spec):
        return
    log.info("writing the synthetic world's %s (%s) to %s", what, spec, root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, rows in generate(spec).items():
        if write_files is not None:
            write_files(root, split, rows)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(rows, **json_options))
    mark_current(marker, spec)
