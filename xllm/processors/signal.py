"""Numeric series (device status, sensor logs): [steps][channels] values -> a normalised [channels, steps] tensor.

Channels first, so series of different lengths batch by padding along time (``collate_media``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xllm.processors.registry import register_processor


@register_processor("signal")
class SignalProcessor:
    @dataclass
    class Config:
        mean: list[float] | None = None  # per channel; None: no centring
        std: list[float] | None = None  # per channel; None: no scaling

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None) -> None:
        if mean is not None and std is not None and len(mean) != len(std):
            raise ValueError(f"signal mean and std need one value per channel each, got {len(mean)} and {len(std)}")
        # No mean subtracts 0 and no std divides by 1, which leave every value as it is.
        self.mean = torch.tensor([0.0] if mean is None else list(mean), dtype=torch.float32)[:, None]
        self.std = torch.tensor([1.0] if std is None else list(std), dtype=torch.float32)[:, None]

    def settings(self) -> dict:
        """What the normalised series depend on (a feature cache records it)."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def __call__(self, series) -> torch.Tensor:
        return (torch.as_tensor(series, dtype=torch.float32).T - self.mean) / self.std  # [channels, steps]
