"""Time the vectorised integrate-and-fire against the frame-by-frame reference loop.

    PYTHONPATH=. python benchmarks/cif.py     (or plain python after `pip install -e .`)

The reference loop is the one the tests prove equality against, imported from tests/cif_reference.py (a plain
module needing only torch) so there is only one copy of it and the benchmark runs without the test extras.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from xllm.models.interfaces.cif import integrate_and_fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cif_reference import reference_integrate_and_fire  # noqa: E402

SHAPES = [(1, 100, 256), (8, 200, 256), (8, 500, 512), (16, 1000, 512)]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"{'B':>3} {'T':>5} {'D':>4} {'tokens':>6} {'vectorised ms':>14} {'loop ms':>10} {'speed-up':>9}")
    for batch, frames, dim in SHAPES:
        x = torch.randn(batch, frames, dim)
        # Speech-like weights: about one token every 3-4 encoder frames.
        alphas = torch.rand(batch, frames) * 0.6
        vectorised = best_time(lambda: integrate_and_fire(x, alphas), repeats=5)
        loop = best_time(lambda: reference_integrate_and_fire(x, alphas), repeats=1)
        tokens = int(alphas.sum(1).max())
        print(
            f"{batch:>3} {frames:>5} {dim:>4} {tokens:>6} {vectorised * 1e3:>14.2f} {loop * 1e3:>10.1f} "
            f"{loop / vectorised:>8.0f}x"
        )


if __name__ == "__main__":
    main()
