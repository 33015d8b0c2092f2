"""Text preprocessing for captions and questions: whitespace folded, optionally cut to a number of words."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.processors.registry import register_processor


@register_processor("text")
class TextProcessor:
    @dataclass
    class Config:
        max_words: int | None = None

    def __init__(self, max_words: int | None = None) -> None:
        self.max_words = max_words

    def __call__(self, text: str) -> str:
        return " ".join(text.split()[: self.max_words])
