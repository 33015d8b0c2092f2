"""The update every zoo builder makes: one optimizer step on a gradient clipped to norm 1."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clipped_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                   lr: float) -> None:
    """Back-propagates ``loss``, clips, steps at rate ``lr`` and clears the gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
