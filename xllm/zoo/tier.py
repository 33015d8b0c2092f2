"""A tier of the zoo: named components, each pre-trained here and then frozen, and their cache.

Each component is an ordinary ``save_pretrained`` folder under ``<cache>/zoo/<tier>/<name>``, loaded by the same
code that loads real checkpoints. Building is deterministic (fixed seeds, single process) and cached: a folder
is current while its ``recipe.json`` marker equals its component's recipe. ``build`` writes the marker once
the builder has returned, so the builders know nothing of the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xllm.common.paths import cache_dir, is_current, mark_current

log = logging.getLogger(__name__)


@dataclass
class Tier:
    name: str
    # name -> (recipe, builder): every folder ``zoo:<tier>/<name>`` a config may name.
    components: dict[str, tuple[Any, Callable[[Path, Any], None]]]

    def folder(self) -> Path:
        return cache_dir() / "zoo" / self.name

    def is_built(self, name: str) -> bool:
        return name in self.components and is_current(self.folder() / name / "recipe.json", self.components[name][0])

    def build(self, names: list[str] | None = None, force: bool = False) -> Path:
        """Builds the named components (all by default) that are missing or stale; returns the tier's folder."""
        for name in names or list(self.components):
            if name not in self.components:
                raise KeyError(f"zoo:{self.name} has no component {name!r}; known: {', '.join(self.components)}")
            recipe, builder = self.components[name]
            folder = self.folder() / name
            if force or not self.is_built(name):
                log.info("building zoo:%s/%s in %s", self.name, name, folder)
                # A build that stops half-way must not leave the marker of the folder it was overwriting.
                (folder / "recipe.json").unlink(missing_ok=True)
                builder(folder, recipe)
                mark_current(folder / "recipe.json", recipe)
        return self.folder()

    def missing(self, names: list[str]) -> list[str]:
        """The named components whose folders are absent or were built by another recipe."""
        return [n for n in names if not self.is_built(n)]
