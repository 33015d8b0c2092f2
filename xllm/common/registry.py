"""Name -> class registry for every pluggable component.

Configs name components by string (``llm: hf_causal``, ``builder: coco_caption``); the registry turns those
strings into classes. An unknown name is an error that lists the known names and the closest match, so a
typo in a YAML file never becomes a silent default.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, TypeVar

T = TypeVar("T")

KINDS = ("model", "encoder", "interface", "adapter", "llm", "processor", "builder", "task", "runner")


class Registry:
    def __init__(self, plugins: str | None = None) -> None:
        self._entries: dict[str, dict[str, object]] = {kind: {} for kind in KINDS}
        # The module that imports every registering module, loaded by name on the first lookup: lookups then
        # see every component without ``common`` importing the layers above it.
        self._plugins = plugins

    def register(self, kind: str, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("llm", "hf_causal")``."""
        table = self._table(kind)

        def wrap(obj: T) -> T:
            if name in table and table[name] is not obj:
                raise KeyError(f"{kind} {name!r} is already registered by {table[name]!r}")
            table[name] = obj
            return obj

        return wrap

    def get(self, kind: str, name: str) -> object:
        self._load_plugins()
        table = self._table(kind)
        if name not in table:
            raise KeyError(unknown_name_message(kind, name, table))
        return table[name]

    def names(self, kind: str) -> list[str]:
        self._load_plugins()
        return sorted(self._table(kind))

    def _load_plugins(self) -> None:
        if self._plugins is not None:
            plugins, self._plugins = self._plugins, None
            importlib.import_module(plugins)

    def _table(self, kind: str) -> dict[str, object]:
        if kind not in self._entries:
            raise KeyError(unknown_name_message("registry kind", kind, self._entries))
        return self._entries[kind]


def unknown_name_message(kind: str, name: str, known) -> str:
    known = sorted(known)
    message = f"unknown {kind} {name!r}; known: {', '.join(known) or '(none)'}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message


registry = Registry(plugins="xllm.registration")
