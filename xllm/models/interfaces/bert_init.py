"""Start a Q-Former with a text branch from a pre-trained BERT, as BLIP-2 starts from bert-base-uncased.

Self-attention, embeddings and the text FFN take BERT's weights, the query FFN (``*_query``) a copy of the text
FFN, and cross-attention keeps its fresh initialisation (BERT has none). The Q-Former's sizes must be BERT's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel

from xllm.common.checkpoint import load_state, weights_elsewhere
from xllm.models.sources import model_folder

# BertModel key -> Q-Former interface keys (one BERT tensor may fill several).
_LAYER_RULES = [
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
     [r"qformer.encoder.layer.\1.attention.attention.\2.\3"]),
    (r"encoder\.layer\.(\d+)\.attention\.output\.(dense|LayerNorm)\.(weight|bias)",
     [r"qformer.encoder.layer.\1.attention.output.\2.\3"]),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)",
     [r"qformer.encoder.layer.\1.intermediate.dense.\2", r"qformer.encoder.layer.\1.intermediate_query.dense.\2"]),
    (r"encoder\.layer\.(\d+)\.output\.(dense|LayerNorm)\.(weight|bias)",
     [r"qformer.encoder.layer.\1.output.\2.\3", r"qformer.encoder.layer.\1.output_query.\2.\3"]),
    (r"embeddings\.LayerNorm\.(weight|bias)", [r"qformer.layernorm.\1"]),
]
# Read below (word, position and token-type tables) or not needed (buffers, the pooler).
_ELSEWHERE = re.compile(r"embeddings\.((word|position|token_type)_embeddings\.weight|position_ids|token_type_ids)"
                        r"|pooler\..+")
SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def init_text_branch_from_bert(interface: nn.Module, spec: str) -> list[str]:
    """Copies a ``BertModel`` folder's weights into ``interface`` (a ``QFormerWithText``); returns the keys filled."""
    folder = model_folder(spec, "interface.text_init")
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"interface.text_init {spec!r}: no BERT folder with config.json at {folder}")
    if weights_elsewhere(folder):  # the shared model's own file holds what BERT would have started it from
        return []
    bert = BertModel.from_pretrained(folder)
    own_config = interface.qformer.config
    mismatched = [f"{name}: BERT {getattr(bert.config, name)} vs interface {getattr(own_config, name)}"
                  for name in SIZES if getattr(bert.config, name) != getattr(own_config, name)]
    if mismatched:
        raise ValueError(f"interface.text_init {folder}: the Q-Former's sizes must be BERT's; {'; '.join(mismatched)}")
    source = bert.state_dict()
    own = interface.state_dict()
    filled: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        for pattern, templates in _LAYER_RULES:
            match = re.fullmatch(pattern, key)
            if match is not None:
                filled.update({match.expand(template): tensor for template in templates})
                break
        else:
            if not _ELSEWHERE.fullmatch(key):
                raise ValueError(f"interface.text_init {folder}: unexpected BERT key {key}")
    embeddings = source["embeddings.word_embeddings.weight"]
    words = own["text.word_embeddings.weight"].clone()
    if embeddings.shape[0] > words.shape[0]:
        raise ValueError(f"interface.text_init {folder}: BERT has {embeddings.shape[0]} words, the tokenizer "
                         f"{words.shape[0]}: use BERT's own tokenizer folder as interface.tokenizer")
    words[: embeddings.shape[0]] = embeddings  # the rows past BERT's vocabulary ([DEC]) keep their initialisation
    filled["text.word_embeddings.weight"] = words
    # BERT adds token-type 0's embedding to every token; the Q-Former has no token types, so it joins the positions.
    positions = source["embeddings.position_embeddings.weight"] + source["embeddings.token_type_embeddings.weight"][0]
    count = min(positions.shape[0], own["text.position_embeddings.weight"].shape[0])
    position_table = own["text.position_embeddings.weight"].clone()
    position_table[:count] = positions[:count]
    filled["text.position_embeddings.weight"] = position_table
    load_state(interface, filled, f"interface.text_init {folder}", missing_ok=True)  # BERT fills a part by design
    return sorted(filled)

