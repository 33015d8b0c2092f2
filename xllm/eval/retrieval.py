"""Image-text retrieval metrics: recall@k in both directions from one similarity matrix.

Image ``i`` and text ``i`` are the matching pair (one caption per image, as the synthetic world has); every
other row or column is a distractor.
"""

from __future__ import annotations

import torch


def recall_at_k(scores: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Share of rows whose own column (the diagonal) is among their ``k`` best-scored columns."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"retrieval scores must be a square [queries, candidates] matrix, got {tuple(scores.shape)}")
    own = scores.diagonal().unsqueeze(1)
    # Rank = candidates scored strictly higher than the right one: ties count in the query's favour.
    rank = (scores > own).sum(dim=1)
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_report(image_to_text: torch.Tensor, text_to_image: torch.Tensor | None = None,
                     ks: tuple[int, ...] = (1, 5), prefix: str = "") -> dict[str, float]:
    """``{prefix}i2t_r@k`` (an image finds its caption) and ``{prefix}t2i_r@k`` (a caption finds its image)."""
    if text_to_image is None:
        text_to_image = image_to_text.T
    i2t, t2i = recall_at_k(image_to_text, ks), recall_at_k(text_to_image, ks)
    report = {f"{prefix}{way}_r@{k}": v for way, recalls in (("i2t", i2t), ("t2i", t2i)) for k, v in recalls.items()}
    if 1 in ks:
        report[f"{prefix}mean_r@1"] = (i2t[1] + t2i[1]) / 2
    return report
