"""The learning-rate schedule every loop uses (the runner's and the zoo's): warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float,
              warmup_from_zero: bool = False) -> float:
    """The peak rate's share at optimizer step ``step`` (from 0) of ``total``: a linear warm-up over ``warmup``
    steps, then ``schedule`` down to ``min_ratio``.

    The warm-up's first step runs at 1/warmup; ``warmup_from_zero`` starts it at 0 instead, step/warmup, as
    transformers' ``get_cosine_schedule_with_warmup`` does (the tiny ChatGLM was built with that schedule).
    """
    if step < warmup:
        return (step if warmup_from_zero else step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"run.lr_schedule must be cosine, linear or constant, got {schedule!r}")
