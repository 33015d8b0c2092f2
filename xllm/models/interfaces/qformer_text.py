"""BLIP-2's stage-1 Q-Former: the ``qformer`` interface plus the text branch its pre-training needs.

The text branch shares the Q-Former's self-attention layers with the queries and adds word and position
embeddings, a text FFN in every layer (transformers' ``use_qformer_text_input``), an LM head tied to the word
embeddings, the contrastive projections (``vision_proj``, ``text_proj``, temperature ``temp``) and the matching
head (``itm_head``). Every pass below is one call of transformers' ``Blip2QFormerModel`` on [queries; text]
embeddings with ``query_length`` and an attention mask: that model hands a 4-D mask to its layers unchanged,
which is all the image-grounded generation mask needs, so no attention code is written here.

State-dict names are the ones ``xllm.models.converters.blip2`` writes, so BLIP-2's released stage-1 weights load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoTokenizer, Blip2QFormerConfig, PreTrainedTokenizerBase
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from xllm.common.config import path_field
from xllm.models.sources import model_folder
from xllm.models.registry import register_interface
from xllm.models.interfaces.bert_init import init_text_branch_from_bert
from xllm.models.interfaces.qformer import QFormerInterface

DECODE_TOKEN = "[DEC]"  # BLIP-2 starts generated captions with this token in place of [CLS]

_TEXT_BRANCH_KEY = re.compile(
    r"interfaces\.[^.]+\.((text|lm_head|vision_proj|text_proj|itm_head)\..+|temp"
    r"|qformer\.encoder\.layer\.\d+\.(intermediate|output)\..+)")


def is_text_branch_key(name: str) -> bool:
    """Whether a composite state-dict key belongs to a Q-Former's stage-1 text branch (never used by stage 2)."""
    return _TEXT_BRANCH_KEY.fullmatch(name) is not None


def load_text_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """A tokenizer folder, ``zoo:`` path or Hub id (``xllm.models.sources``) with [CLS]/[SEP]/[PAD]; [DEC] is added if absent."""
    folder = model_folder(spec, "interface.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    missing = [name for name in ("cls_token", "sep_token", "pad_token") if getattr(tokenizer, name) is None]
    if missing:
        raise ValueError(f"tokenizer {folder} lacks {', '.join(missing)}: the text branch needs a BERT-style tokenizer")
    if tokenizer.bos_token != DECODE_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DECODE_TOKEN})  # what LAVIS does to bert-base-uncased
    return tokenizer


class LMHead(nn.Module):
    """BERT's prediction head under the names LAVIS's ``cls.predictions`` converts to (one decoder bias).

    transformers' ``BertLMPredictionHead`` keeps a second ``bias`` parameter tied by its parent model, which
    would add a key no checkpoint has; the transform itself is reused.
    """

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT and BLIP-2

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


@register_interface("qformer_text")
class QFormerWithText(QFormerInterface):
    @dataclass
    class Config(QFormerInterface.Config):
        tokenizer: str = path_field("model", default="zoo:tiny/text_tokenizer")  # a BERT-style tokenizer folder
        max_text_length: int = 32  # tokens per caption, [CLS] and [SEP] included (BLIP-2: 32)
        max_position_embeddings: int = 512
        embed_dim: int = 256  # width of the contrastive space (BLIP-2: 256)
        text_init: str | None = path_field("model", default=None)  # a BertModel folder to start from (BLIP-2: bert-base-uncased); sizes must match

    def __init__(self, config: Blip2QFormerConfig, num_query_tokens: int, tokenizer: PreTrainedTokenizerBase,
                 max_text_length: int, embed_dim: int) -> None:
        super().__init__(config, num_query_tokens)
        hidden = config.hidden_size
        self.text = Blip2TextEmbeddings(config)
        self.lm_head = LMHead(config, self.text.word_embeddings)
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for module in (self.text, self.lm_head, self.vision_proj, self.text_proj, self.itm_head):
            module.apply(self.qformer._init_weights)  # BERT's initialisation, as the Q-Former's own layers get
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length

    @classmethod
    def build(cls, cfg, input_dim: int) -> QFormerWithText:
        tokenizer = load_text_tokenizer(cfg.tokenizer)
        if cfg.max_text_length > cfg.max_position_embeddings:
            raise ValueError(f"interface.max_text_length {cfg.max_text_length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        config = cls.qformer_config(cfg, input_dim, use_qformer_text_input=True, vocab_size=len(tokenizer),
                                    max_position_embeddings=cfg.max_position_embeddings,
                                    pad_token_id=tokenizer.pad_token_id)
        interface = cls(config, cfg.num_query_tokens, tokenizer, cfg.max_text_length, cfg.embed_dim)
        if cfg.text_init:
            init_text_branch_from_bert(interface, cfg.text_init)
        return interface

    # ----------------------------------------------------------------- text

    def decoder_input(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids a caption is generated from: [DEC] in place of [CLS]."""
        ids = ids.clone()
        ids[:, 0] = self.tokenizer.bos_token_id
        return ids

    # ----------------------------------------------------------------- the three passes

    def image_queries(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Query outputs [N, Q, H] that read the image (the stage-2 path)."""
        return self(features, mask)[0]

    def text_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoding [N, T, H]: bidirectional self-attention, no queries, no image."""
        return self.qformer(query_embeds=self.text(ids), query_length=0, attention_mask=mask).last_hidden_state

    def matching_states(self, features: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                        text_mask: torch.Tensor) -> torch.Tensor:
        """Query outputs [N, Q, H] of a joint pass where queries and text attend to each other (ITM)."""
        queries = self.query_tokens.expand(len(ids), -1, -1)
        joint_mask = torch.cat([torch.ones(queries.shape[:2], dtype=text_mask.dtype, device=text_mask.device),
                                text_mask], dim=1)
        out = self.qformer(query_embeds=self.text(ids, query_embeds=queries), query_length=queries.shape[1],
                           attention_mask=joint_mask, encoder_hidden_states=features,
                           encoder_attention_mask=mask.long()).last_hidden_state
        return out[:, : queries.shape[1]]

    def generation_logits(self, features: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                          text_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits [N, T, V] of the text positions under the image-grounded causal mask (ITG).

        The queries are recomputed in this pass rather than cached from the contrastive pass (BLIP-2 reuses
        their keys and values): the masked queries see only queries, so the result is the same.
        """
        queries = self.query_tokens.expand(len(ids), -1, -1)
        embeds = self.text(ids, query_embeds=queries)
        attention = grounded_causal_mask(queries.shape[1], text_mask, embeds.dtype)
        out = self.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=attention,
                           encoder_hidden_states=features, encoder_attention_mask=mask.long()).last_hidden_state
        return self.lm_head(out[:, queries.shape[1]:])


def grounded_causal_mask(num_queries: int, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [N, 1, Q + T, Q + T]: queries see all queries only; text sees all queries and earlier text.

    Padded text positions are hidden from every row; they still see the queries, so no row is empty.
    """
    n, length = text_mask.shape
    total = num_queries + length
    device = text_mask.device
    allowed = torch.zeros(n, total, total, dtype=torch.bool, device=device)
    allowed[:, :, :num_queries] = True
    allowed[:, :num_queries, num_queries:] = False
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
    allowed[:, num_queries:, num_queries:] = causal & text_mask.bool()[:, None, :]
    additive = torch.zeros(n, 1, total, total, dtype=dtype, device=device)
    return additive.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
