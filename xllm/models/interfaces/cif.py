"""Continuous Integrate-and-Fire (Dong & Xu, 2020): encoder frames -> about one vector per output token.

Each frame t gets a weight alpha_t in [0, 1]. Laid end to end, frame t covers the interval
[c_{t-1}, c_t) of the weight axis, where c is the cumulative sum of alpha; token k covers
[k * threshold, (k + 1) * threshold). Token k's vector is the sum over frames of x_t times the length of
the overlap of the two intervals, so a frame straddling a boundary gives the part up to the threshold to the
current token and the remainder to the next one, and a frame with alpha > threshold (possible after scaling
to target lengths) spans several tokens. Computed from the overlaps directly, the whole thing is a few
tensor ops and one scatter_add per boundary a frame can cross, with no loop over frames.

Tail rule: the weight left after the last full token (less than one threshold) fires one more token when it
is at least ``tail_threshold``; that token's vector is rescaled by threshold / leftover so its magnitude is
that of a full token. A smaller leftover is dropped. The same rule applies in training and at inference: with
alphas scaled to the target length the leftover is either ~0 or ~threshold (rounding), so the number of
tokens equals the target length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CIFOutput:
    fired: torch.Tensor  # [B, T_out, D], zeros past each row's length
    mask: torch.Tensor  # [B, T_out] bool, True for fired tokens
    lengths: torch.Tensor  # [B] number of fired tokens
    alphas: torch.Tensor  # [B, T] predicted weights before any scaling; their row sum is the predicted length
    quantity_loss: torch.Tensor | None  # mean |sum(alpha) - target length|, None without targets


class CIF(nn.Module):
    """Weight predictor (Conv1d -> ReLU -> Linear -> sigmoid) followed by integrate-and-fire."""

    def __init__(self, dim: int, kernel_size: int = 3, threshold: float = 1.0, tail_threshold: float = 0.5) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the weights stay aligned with the frames, got {kernel_size}")
        if not 0.0 < tail_threshold <= threshold:
            raise ValueError(f"tail_threshold must be in (0, threshold={threshold}], got {tail_threshold}")
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.weight_proj = nn.Linear(dim, 1)
        self.threshold = threshold
        self.tail_threshold = tail_threshold

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, target_lengths: torch.Tensor | None = None
    ) -> CIFOutput:
        """x [B, T, D]; mask [B, T] True for real frames; target_lengths [B] (training) scales the alphas."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        # Zero the padding first so the convolution does not smear it into the last real frames.
        x = x * mask[..., None]
        hidden = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        alphas = torch.sigmoid(self.weight_proj(hidden)).squeeze(-1) * mask
        quantity_loss = None
        fire_alphas = alphas
        if target_lengths is not None:
            target = target_lengths.to(alphas.dtype)
            quantity_loss = (alphas.sum(dim=1) - target).abs().mean()
            # Teacher forcing: fire exactly target-length tokens so they line up with the labels.
            fire_alphas = alphas * (target * self.threshold / alphas.sum(dim=1).clamp_min(1e-6))[:, None]
        fired, lengths = integrate_and_fire(x, fire_alphas, self.threshold, self.tail_threshold)
        token_mask = torch.arange(fired.shape[1], device=x.device)[None, :] < lengths[:, None]
        return CIFOutput(fired, token_mask, lengths, alphas, quantity_loss)


def integrate_and_fire(
    x: torch.Tensor, alphas: torch.Tensor, threshold: float = 1.0, tail_threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fired [B, T_out, D], lengths [B]) from frames x [B, T, D] with weights alphas [B, T] (>= 0, any size), by
    the boundary and tail rules of the module docstring."""
    batch, frames, dim = x.shape
    if alphas.shape != (batch, frames):
        raise ValueError(f"alphas must be [B, T] = {(batch, frames)}, got {tuple(alphas.shape)}")
    # Positions in units of the threshold: token k covers [k, k + 1). A float32 running sum over thousands of
    # frames drifts by ~1e-5 and moves the boundaries with it; float64 does not (MPS has no float64).
    position_dtype = torch.float32 if alphas.device.type == "mps" else torch.float64
    end = torch.cumsum(alphas.to(position_dtype), dim=1) / threshold
    start = torch.cat([end.new_zeros(batch, 1), end[:, :-1]], dim=1)
    total = end[:, -1] if frames else end.new_zeros(batch)
    full_tokens = torch.floor(total).long()
    leftover = (total - full_tokens) * threshold
    has_tail = leftover >= tail_threshold
    lengths = full_tokens + has_tail.long()
    max_tokens = int(lengths.max()) if batch else 0

    first_token = torch.floor(start).long()
    # How many boundaries the widest frame crosses bounds the number of pieces a frame is split into.
    pieces = int((torch.floor(end).long() - first_token).max()) + 1 if frames else 0
    # One spare slot at the end collects pieces of tokens that never fire (leftover below tail_threshold).
    out = x.new_zeros(batch, max_tokens + 1, dim)
    for piece in range(pieces):
        token = first_token + piece
        lower = token.to(position_dtype)
        overlap = (torch.minimum(end, lower + 1.0) - torch.maximum(start, lower)).clamp_min(0.0)
        weight = (overlap * threshold).to(x.dtype)
        index = torch.where(token < lengths[:, None], token, torch.full_like(token, max_tokens))
        out.scatter_add_(1, index[..., None].expand(-1, -1, dim), x * weight[..., None])
    # The tail token holds only `leftover` weight; scale it as if it had integrated a full threshold.
    is_tail = (torch.arange(max_tokens, device=x.device)[None, :] == full_tokens[:, None]) & has_tail[:, None]
    tail_scale = (threshold / leftover.clamp_min(1e-12)[:, None]).to(x.dtype)
    scale = torch.where(is_tail, tail_scale, torch.ones_like(is_tail, dtype=x.dtype))
    return out[:, :max_tokens] * scale[..., None], lengths
