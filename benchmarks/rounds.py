"""Timing shared by the benchmarks that set xllm against a peer, or one setting against another, in one process.

Rounds alternate the contestants (each round runs every one of them once, in order), so a change in the machine's
load during the measurement reaches all of them alike; a comparison is then the ratio of the two within each round,
summarised by its median and range over the rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def alternating(contestants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each contestant's call, one per round."""
    seconds: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, work in contestants.items():
            seconds[name].append(timed(work))
    return seconds


def spread(values: list[float], digits: int = 2) -> str:
    """Median (minimum-maximum)."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def speed_ratios(seconds: list[float], peer_seconds: list[float]) -> list[float]:
    """Per round, how many times faster than its peer a contestant ran (the peer's time over its own)."""
    return [peer / own for own, peer in zip(seconds, peer_seconds)]
