"""Name -> component tables, one per kind, filled where the components are defined.

Configs name components by string (``llm: {backend: hf_causal}``, ``builder: coco_caption``). Each package
owns the tables of its kinds (``xllm.models.registry``, ``xllm.datasets.registry``, ...) and its modules
register themselves with a decorator, as timm's ``@register_model`` does; importing a package registers its
components, so looking up a model part imports models only. A name with a dot is a dotted path
(``mypackage.encoders.MyEncoder``), imported on demand, so a project can plug in a component without
registering it here. An unknown name is an error listing the known names and the closest match.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ENCODERS.register("whisper")``."""

        def wrap(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return wrap

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if "." in name:
            return _import_dotted(name, self.kind)
        raise KeyError(unknown_name_message(self.kind, name, self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)


def _import_dotted(path: str, kind: str):
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise KeyError(f"{kind} {path!r}: cannot import it as a dotted path ({error})") from None


def unknown_name_message(kind: str, name: str, known) -> str:
    known = sorted(known)
    message = f"unknown {kind} {name!r}; known: {', '.join(known) or '(none)'}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message
