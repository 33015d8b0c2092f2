"""The learning-rate schedule every loop uses (the runner's and the zoo's): warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The factor on the peak learning rate at optimizer step ``step`` (from 0) of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"run.lr_schedule must be cosine, linear or constant, got {schedule!r}")
