"""The tiny tier: its components, pre-trained on the synthetic world and then frozen, and their cache.

Each component is an ordinary ``save_pretrained`` folder under ``<cache>/zoo/tiny/<name>``, loaded by the same
code that loads real checkpoints. Building is deterministic (fixed seeds, single process) and cached: a folder
is current while its ``recipe.json`` marker equals its component's recipe. ``build`` writes the marker once
the builder has returned, so the builders know nothing of the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xllm.common.paths import cache_dir, is_current, mark_current
from xllm.zoo.image_encoder import TinyEncoderRecipe, build_image_encoder
from xllm.zoo.speech import TinySpeechEncoderRecipe, build_speech_encoder
from xllm.zoo.text_tokenizer import TinyTextTokenizerRecipe, build_text_tokenizer
from xllm.zoo.tiny_chatglm import TinyChatGLMRecipe, build_chatglm_llm
from xllm.zoo.tiny_llm import TinyLLMRecipe, build_llm

log = logging.getLogger(__name__)

COMPONENTS: dict[str, tuple[Any, Callable[[Path, Any], None]]] = {
    # name -> (recipe, builder): every folder ``zoo:tiny/<name>`` a config may name.
    "llm": (TinyLLMRecipe(), build_llm),
    "image_encoder": (TinyEncoderRecipe(), build_image_encoder),
    "text_tokenizer": (TinyTextTokenizerRecipe(), build_text_tokenizer),
    "speech_encoder": (TinySpeechEncoderRecipe(), build_speech_encoder),
    "chatglm_llm": (TinyChatGLMRecipe(), build_chatglm_llm),
}


def zoo_dir() -> Path:
    return cache_dir() / "zoo" / "tiny"


def is_built(folder: Path, recipe: Any) -> bool:
    return is_current(folder / "recipe.json", recipe)


def build(names: list[str] | None = None, force: bool = False) -> Path:
    """Builds the named components (all by default) that are missing or stale; returns the tier's folder."""
    root = zoo_dir()
    for name in names or list(COMPONENTS):
        if name not in COMPONENTS:
            raise KeyError(f"zoo:tiny has no component {name!r}; known: {', '.join(COMPONENTS)}")
        recipe, builder = COMPONENTS[name]
        folder = root / name
        if force or not is_built(folder, recipe):
            log.info("building zoo:tiny/%s in %s", name, folder)
            # A build that stops half-way must not leave the marker of the folder it was overwriting.
            (folder / "recipe.json").unlink(missing_ok=True)
            builder(folder, recipe)
            mark_current(folder / "recipe.json", recipe)
    return root


def missing(names: list[str]) -> list[str]:
    """The named components whose folders are absent or were built by another recipe."""
    return [n for n in names if n not in COMPONENTS or not is_built(zoo_dir() / n, COMPONENTS[n][0])]
