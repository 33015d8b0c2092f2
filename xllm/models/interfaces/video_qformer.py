"""Video interface: each frame through the image Q-Former with the video's own queries and frame positions.

The Q-Former module is the image modality's (``shares: image``), as in X-LLM; what is the video's own is
``query_tokens`` (X-LLM's ``video_query_tokens``) and ``frame_position``, a learned embedding per frame index
that is added to that frame's query outputs. Adding it after the Q-Former (not to the queries) leaves the
shared Q-Former's input distribution as image training left it, and still tells the LLM which frame each
output came from: motion is the difference between frames, so their order must survive. The outputs of all
frames are concatenated in time order: T x Q positions in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xllm.models.registry import register_interface


@register_interface("video_qformer")
class VideoQFormerInterface(nn.Module):
    @dataclass
    class Config:
        num_query_tokens: int = 32
        max_frames: int = 8  # rows of the frame position table: the most frames a video may have

    def __init__(self, qformer: nn.Module, hidden_size: int, num_query_tokens: int, max_frames: int) -> None:
        super().__init__()
        self.qformer = qformer
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden_size) * 0.02)
        self.frame_position = nn.Embedding(max_frames, hidden_size)
        nn.init.normal_(self.frame_position.weight, std=0.02)
        self.output_dim = hidden_size

    @classmethod
    def build(cls, cfg, input_dim: int, shared=None) -> "VideoQFormerInterface":
        qformer = getattr(getattr(shared, "interface", None), "qformer", None)
        if qformer is None:
            raise ValueError("the 'video_qformer' interface reuses an image modality's Q-Former: set "
                             "model.modalities.<video>.shares to a modality whose interface is a qformer")
        return cls(qformer, shared.interface.output_dim, cfg.num_query_tokens, cfg.max_frames)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, tokens, D] frame features -> [B, T * Q, H] outputs and an all-true mask."""
        batch, frames = features.shape[:2]
        if frames > self.frame_position.num_embeddings:
            raise ValueError(f"a video of {frames} frames exceeds the interface's max_frames="
                             f"{self.frame_position.num_embeddings}")
        queries = self.query_tokens.expand(batch * frames, -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features.flatten(0, 1),
                           encoder_attention_mask=mask.flatten(0, 1).long()).last_hidden_state
        out = out.unflatten(0, (batch, frames)) + self.frame_position.weight[:frames, None, :]
        out = out.flatten(1, 2)
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
