"""The training loop of every zoo builder: scheduled AdamW updates on gradients clipped to norm 1, with a progress
bar and a log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from xllm.runners.schedule import lr_factor

log = logging.getLogger(__name__)

# What a builder's step function returns: the loss, or the loss and other values to log with it (an accuracy).
StepLoss = torch.Tensor | tuple[torch.Tensor, dict[str, float]]


@dataclass(frozen=True)
class Schedule:
    """A linear warm-up to ``lr`` over ``warmup`` steps, then a cosine decay to zero: the runner's ``lr_factor``."""

    lr: float
    warmup: int
    warmup_from_zero: bool = False  # the warm-up's first step at rate 0 (see lr_factor)

    def rate(self, step: int, total: int) -> float:
        return self.lr * lr_factor(step, total, self.warmup, "cosine", 0.0, warmup_from_zero=self.warmup_from_zero)


def train(name: str, modules: Sequence[torch.nn.Module], steps: int, schedule: Schedule,
          step_loss: Callable[[int], StepLoss], log_every: int = 100, **adamw: Any) -> None:
    """Makes ``steps`` clipped AdamW updates (``adamw``: its options but the rate) of the parameters of ``modules``,
    which train meanwhile and are left in eval mode; step ``k`` (from 0) is on the loss ``step_loss(k)``. Logs every
    ``log_every`` steps and at the last (through the progress bar, so that it does not break the bar's line)."""
    trained = torch.nn.ModuleList(modules)
    params = list(trained.parameters())
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, **adamw)
    trained.train()
    start = time.time()
    with logging_redirect_tqdm(), tqdm(total=steps, desc=name, dynamic_ncols=True) as progress:
        for step in range(steps):
            result = step_loss(step)
            loss, extras = result if isinstance(result, tuple) else (result, {})
            for group in optimizer.param_groups:
                group["lr"] = schedule.rate(step, steps)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            progress.update(1)
            if step % log_every == 0 or step == steps - 1:
                values = "".join(f" {key} {value:.3f}" for key, value in extras.items())
                log.info("%s step %d/%d loss %.3f%s (%.0fs)", name, step + 1, steps, loss.item(), values,
                         time.time() - start)
    trained.eval()
