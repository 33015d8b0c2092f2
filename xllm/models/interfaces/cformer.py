"""C-Former interface (X-LLM's speech interface): CIF compresses encoder frames, transformer layers follow.

Speech-encoder frames (50 per second for Whisper) are projected to the C-Former's width, CIF integrates them
into about one vector per output token, and a BERT encoder (transformers' ``BertModel`` fed ``inputs_embeds``:
position embeddings, then self-attention over the fired vectors) turns those into the LLM's "foreign
language". The number of vectors differs per utterance; the returned mask says which are real, and the
composite splices exactly that many speech positions into each prompt.

The BERT layers may start from a BERT checkpoint folder (X-LLM used bert-base-chinese; the mini tier has
all-MiniLM-L6-v2): the folder's config then fixes the width and depth, and the sizes in ``Config`` are unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, BertModel

from xllm.common.checkpoint import weights_elsewhere
from xllm.common.config import path_field
from xllm.models.interfaces.cif import CIF, CIFOutput
from xllm.models.registry import register_interface
from xllm.models.sources import model_folder


@dataclass
class CFormerOutput:
    hidden: torch.Tensor  # [N, T_fired, H], zeros past each row's length
    mask: torch.Tensor  # [N, T_fired] bool, True for fired tokens
    cif: CIFOutput  # alphas, fired lengths and (with target lengths) the quantity loss


@register_interface("cformer")
class CFormerInterface(nn.Module):
    @dataclass
    class Config:
        hidden_size: int = 128
        num_hidden_layers: int = 2
        num_attention_heads: int = 4
        intermediate_size: int = 256
        max_tokens: int = 512  # position embeddings: the most tokens one utterance may fire
        dropout: float = 0.1
        cif_kernel_size: int = 3
        cif_threshold: float = 1.0
        cif_tail_threshold: float = 0.5  # see xllm.models.interfaces.cif: a smaller leftover fires no token
        # Tokens per encoder frame before training. An untrained CIF weighs every frame ~0.5 (sigmoid of ~0), one
        # token per two frames, far more than speech holds (Whisper: 50 frames/s; speech: ~3-15 tokens/s).
        initial_rate: float = 0.1
        bert_path: str | None = path_field("model", default=None)  # a BERT folder (or zoo: path) to start the transformer layers from

    def __init__(self, bert: BertModel, input_dim: int, cif: CIF) -> None:
        super().__init__()
        width = bert.config.hidden_size
        self.input_proj = nn.Linear(input_dim, width)
        self.cif = cif
        self.bert = bert
        self.output_dim = width

    @classmethod
    def build(cls, cfg, input_dim: int) -> "CFormerInterface":
        if cfg.bert_path:
            folder = model_folder(cfg.bert_path, "interface.bert_path")
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"interface.bert_path {folder} is not a BERT checkpoint folder (no config.json)")
            if weights_elsewhere(folder):
                bert = BertModel(BertConfig.from_pretrained(folder), add_pooling_layer=False)
            else:
                bert = BertModel.from_pretrained(str(folder), add_pooling_layer=False)
        else:
            config = BertConfig(
                vocab_size=1,  # never looked up: the layers read inputs_embeds only
                hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_tokens, hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout)
            bert = BertModel(config, add_pooling_layer=False)
        if not 0.0 < cfg.initial_rate < 1.0:
            raise ValueError(f"interface.initial_rate must be in (0, 1) tokens per frame, got {cfg.initial_rate}")
        cif = CIF(bert.config.hidden_size, cfg.cif_kernel_size, cfg.cif_threshold, cfg.cif_tail_threshold)
        with torch.no_grad():
            cif.weight_proj.bias.fill_(math.log(cfg.initial_rate / (1.0 - cfg.initial_rate)))
        return cls(bert, input_dim, cif)

    def fire(self, features: torch.Tensor, mask: torch.Tensor,
             target_lengths: torch.Tensor | None = None) -> CFormerOutput:
        """Encoder frames [N, T, D_in] with mask [N, T] -> C-Former outputs; ``target_lengths`` [N] (training)
        makes CIF fire exactly that many tokens per row and yields the quantity loss."""
        cif = self.cif(self.input_proj(features), mask, target_lengths)
        limit = self.bert.config.max_position_embeddings
        if cif.fired.shape[1] > limit:
            raise ValueError(f"CIF fired {cif.fired.shape[1]} tokens for one utterance, more than the C-Former's "
                             f"{limit} positions (interface max_tokens); split the audio")
        if cif.fired.shape[1] == 0:  # nothing fired in the whole batch (silence): no positions to attend over
            return CFormerOutput(cif.fired, cif.mask, cif)
        hidden = self.bert(inputs_embeds=cif.fired, attention_mask=cif.mask.long()).last_hidden_state
        return CFormerOutput(hidden * cif.mask[..., None], cif.mask, cif)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [N, T_fired, H], mask [N, T_fired]): a variable number of vectors per utterance."""
        out = self.fire(features, mask)
        return out.hidden, out.mask
