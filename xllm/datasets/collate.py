"""Batching of samples whose media differ in kind, count and length.

A sample is a dict of text fields (``id``, ``prompt``, ``answer``, ``history``) and media fields (``image``,
``video``, ``speech``, ...) holding a tensor, a list of tensors (several media in one prompt) or None. The
composite model wants each modality's media as one batch in the order their markers appear across the
prompts, which is sample order, then order within a sample: that is what this builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEXT_FIELDS = ("id", "prompt", "answer", "history", "task", "lang")


def pad_last(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of different lengths along their last dimension, zero-padded, with their lengths."""
    longest = max(t.shape[-1] for t in tensors)
    padded = torch.stack([F.pad(t, (0, longest - t.shape[-1])) for t in tensors])
    return {"features": padded, "lengths": torch.tensor([t.shape[-1] for t in tensors])}


def collate_media(items: list[torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    if all(t.shape == items[0].shape for t in items):
        return torch.stack(items)
    if all(t.shape[:-1] == items[0].shape[:-1] for t in items):
        return pad_last(items)
    raise ValueError(f"cannot batch media of shapes {sorted({tuple(t.shape) for t in items})}")


def collate(samples: list[dict]) -> dict:
    batch: dict = {}
    keys = {key for sample in samples for key in sample}
    for key in sorted(keys):
        values = [sample.get(key) for sample in samples]
        if key in TEXT_FIELDS or not any(isinstance(v, (torch.Tensor, list)) for v in values):
            batch[key] = values
            continue
        items = []
        for value in values:
            if isinstance(value, torch.Tensor):
                items.append(value)
            elif isinstance(value, list):
                items.extend(value)
        batch[key] = collate_media(items) if items else None
    return batch
