"""Frame-by-frame integrate-and-fire, the independent reference the vectorised ``integrate_and_fire`` is proven
equal to (tests/test_cif.py) and timed against (benchmarks/cif.py).

A plain module (torch only, no pytest) outside the package: it is a test oracle, not runtime code.
"""

from __future__ import annotations

import torch


def reference_integrate_and_fire(
    x: torch.Tensor, alphas: torch.Tensor, threshold: float = 1.0, tail_threshold: float = 0.5
) -> tuple[list[torch.Tensor], list[int]]:
    """Frame-by-frame integrate-and-fire as written in the paper, extended to frames spanning several tokens."""
    rows, lengths = [], []
    for b in range(x.shape[0]):
        tokens = []
        weight, state = 0.0, torch.zeros(x.shape[2], dtype=torch.float64)
        for t in range(x.shape[1]):
            alpha, frame = float(alphas[b, t]), x[b, t].double()
            while weight + alpha >= threshold:
                needed = threshold - weight
                tokens.append(state + needed * frame)
                alpha -= needed
                weight, state = 0.0, torch.zeros_like(state)
            weight += alpha
            state = state + alpha * frame
        if weight >= tail_threshold:
            tokens.append(state * threshold / weight)
        rows.append(torch.stack(tokens) if tokens else torch.zeros(0, x.shape[2], dtype=torch.float64))
        lengths.append(len(tokens))
    return rows, lengths
