"""The zoo's training loop makes, bit for bit, the updates of the plain loops the builders were written with."""

import logging
import math

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from xllm.zoo.loop import Schedule, train

STEPS, WARMUP, LR = 30, 5, 0.05


def toy() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    # Large targets: gradients far above the clipping norm of 1, so the clip is part of what is compared.
    return model, optimizer, torch.randn(STEPS, 8, 4), 10 * torch.randn(STEPS, 8, 1)


def looped(schedule: Schedule) -> nn.Module:
    model, _, inputs, targets = toy()  # the loop makes its own AdamW, with the options of the plain loop's
    train("toy", [model], STEPS, schedule, lambda step: nn.functional.mse_loss(model(inputs[step]), targets[step]),
          weight_decay=0.01)
    return model


def written_out(rate_at, scheduler=None) -> tuple[nn.Module, list[float]]:
    """The plain loop: ``rate_at(step)`` sets the rate, or ``scheduler`` does; returns the model and the norms."""
    model, optimizer, inputs, targets = toy()
    lr_scheduler = scheduler(optimizer) if scheduler else None
    norms = []
    for step in range(STEPS):
        if rate_at:
            for group in optimizer.param_groups:
                group["lr"] = rate_at(step)
        nn.functional.mse_loss(model(inputs[step]), targets[step]).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if lr_scheduler:
            lr_scheduler.step()
    return model, norms


def cosine(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_the_loop_is_the_warmup_and_cosine_loop_written_out():
    reference, norms = written_out(cosine)
    assert max(norms) > 1.0
    assert same_weights(looped(Schedule(LR, WARMUP)), reference)


def test_warmup_from_zero_is_the_loop_under_transformers_cosine_schedule():
    reference, _ = written_out(None, lambda optimizer: get_cosine_schedule_with_warmup(optimizer, WARMUP, STEPS))
    assert same_weights(looped(Schedule(LR, WARMUP, warmup_from_zero=True)), reference)
    assert not same_weights(looped(Schedule(LR, WARMUP)), reference)


def test_the_loop_logs_every_interval_and_the_last_step_with_the_extra_values(caplog):
    model, _, inputs, targets = toy()

    def step_loss(step: int):
        return nn.functional.mse_loss(model(inputs[step]), targets[step]), {"acc": step / 100}

    with caplog.at_level(logging.INFO, logger="xllm.zoo.loop"):
        train("toy", [model], STEPS, Schedule(LR, WARMUP), step_loss, log_every=10, weight_decay=0.01)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" loss ")[0] for line in lines] == [f"toy step {k}/{STEPS}" for k in (1, 11, 21, 30)]
    assert all(" acc " in line for line in lines) and " acc 0.290 " in lines[-1]
