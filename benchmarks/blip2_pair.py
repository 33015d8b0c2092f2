"""One BLIP-2 twice: transformers' ``Blip2ForConditionalGeneration`` and xllm's model holding the same weights.

The benchmarks that compare the two (``blip2_step.py``, ``blip2_generate.py``), and ``feature_cache.py``, which
trains xllm's at these sizes, build them here: a randomly initialised transformers BLIP-2 with a Llama text model is
saved as a checkpoint folder, its language model (and a word-level tokenizer, or one given that spells real text)
as an LLM folder, and xllm's model is built from an xllm model config naming both
(``model.pretrained`` converts the BLIP-2 folder with ``xllm.models.converters.blip2``; ``llm.path`` loads the
Llama). Vision encoder and LLM are frozen, the Q-Former, its queries and the projection train, in both.

Sizes: "tiny" is the tiny tier's shape (64 px, patch 8, ViT 4 x 192, Q-Former 2 x 192, Llama 4 x 256, a
2,000-word vocabulary, 32 text tokens); "small" is 224 px, patch 16, ViT 8 x 384, Q-Former 6 x 384, Llama 8 x 576
(SmolLM2's width and vocabulary of 49,152 words), 48 text tokens. Both have 32 queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.profiler import ProfilerActivity, profile
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.models.xllm import XLLM
from xllm.processors.batch import Batch

SPECIAL_WORDS = ["<pad>", "<unk>", "</s>", "<image>"]  # <image>: transformers' image placeholder token
IMAGE_TOKEN_ID = SPECIAL_WORDS.index("<image>")
QUERIES = 32
PROMPT_TAGS = "<Image><ImageHere></Image>"


@dataclass(frozen=True)
class Size:
    image_size: int
    patch_size: int
    vit_layers: int
    vit_width: int
    qformer_layers: int
    qformer_width: int
    llm_layers: int
    llm_width: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    vocab: int
    text_tokens: int  # prompt words + answer words, half each

    @property
    def heads(self) -> int:  # of the ViT and the Q-Former: 64 wide, as BLIP-2's
        return self.vit_width // 64


SIZES = {
    "tiny": Size(64, 8, 4, 192, 2, 192, 4, 256, 4, 2, 704, 2_000, 32),
    "small": Size(224, 16, 8, 384, 6, 384, 8, 576, 9, 3, 1536, 49_152, 48),
}


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over numbered words: the benchmarks need ids, not language."""
    words = SPECIAL_WORDS + [f"w{i}" for i in range(vocab - len(SPECIAL_WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def hf_blip2(size: Size, seed: int = 0) -> Blip2ForConditionalGeneration:
    """transformers' BLIP-2 of ``size``, randomly initialised; the Q-Former without dropout, so that a training
    step's loss is a function of the weights (and both implementations can be checked to compute the same)."""
    torch.manual_seed(seed)
    vision = Blip2VisionConfig(image_size=size.image_size, patch_size=size.patch_size, hidden_size=size.vit_width,
                               num_hidden_layers=size.vit_layers, num_attention_heads=size.heads,
                               intermediate_size=4 * size.vit_width)
    qformer = Blip2QFormerConfig(hidden_size=size.qformer_width, num_hidden_layers=size.qformer_layers,
                                 num_attention_heads=size.heads, intermediate_size=4 * size.qformer_width,
                                 encoder_hidden_size=size.vit_width, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    text = LlamaConfig(vocab_size=size.vocab, hidden_size=size.llm_width, num_hidden_layers=size.llm_layers,
                       num_attention_heads=size.llm_heads, num_key_value_heads=size.llm_kv_heads,
                       intermediate_size=size.llm_intermediate, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN_ID)
    model = Blip2ForConditionalGeneration(config)
    # BLIP-2 starts its queries at zero; random ones make the check of equal losses meaningful.
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    return freeze_as_stage2(model)


def freeze_as_stage2(model: Blip2ForConditionalGeneration) -> Blip2ForConditionalGeneration:
    model.requires_grad_(False)
    for part in (model.qformer, model.language_projection):
        part.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    return model


def save_folders(hf: Blip2ForConditionalGeneration, size: Size, root: Path,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[Path, Path]:
    """(BLIP-2 checkpoint folder, LLM folder with its tokenizer) under ``root``. The tokenizer is the numbered
    words' unless one is given (one that spells real text: the LLM's ids beyond its vocabulary are never used)."""
    blip2, llm = root / "blip2", root / "llm"
    hf.save_pretrained(blip2)
    hf.language_model.save_pretrained(llm)
    (tokenizer or word_tokenizer(size.vocab)).save_pretrained(llm)
    return blip2, llm


def xllm_model(size: Size, blip2: Path, llm: Path, frozen_dtype: str | None = None,
               compile: tuple[str, ...] = ()) -> XLLM:
    """xllm's stage-2 image model from a model config: its parts sized as ``size``, weights from the folders;
    ``compile`` is ``model.compile``."""
    heads = size.heads
    cfg = {
        "arch": "xllm", "model_type": "tiny",
        "llm": {"backend": "hf_causal", "path": str(llm)},
        "modalities": {"image": {
            "processor": {"name": "image", "image_size": size.image_size},
            "encoder": {"name": "blip2_vision", "path": None, "image_size": size.image_size,
                        "patch_size": size.patch_size, "hidden_size": size.vit_width,
                        "num_hidden_layers": size.vit_layers, "num_attention_heads": heads,
                        "intermediate_size": 4 * size.vit_width},
            "interface": {"name": "qformer", "num_query_tokens": QUERIES, "hidden_size": size.qformer_width,
                          "num_hidden_layers": size.qformer_layers, "num_attention_heads": heads,
                          "intermediate_size": 4 * size.qformer_width, "cross_attention_frequency": 2,
                          "dropout": 0.0},
            "adapter": {"name": "linear"},
        }},
        "pretrained": [str(blip2)],
        "trainable": ["interfaces.image", "adapters.image"],
        "frozen_dtype": frozen_dtype,
        "compile": list(compile),
    }
    return build_model(resolve_model(OmegaConf.create(cfg)))


def images(size: Size, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size.image_size, size.image_size, generator=torch.Generator().manual_seed(seed))


def prompt(size: Size) -> str:
    return f"{PROMPT_TAGS} " + " ".join(f"w{i}" for i in range(size.text_tokens // 2))


def xllm_batch(model: XLLM, size: Size, pixels: torch.Tensor) -> Batch:
    """A training batch: each image after the same prompt of half the text tokens, an answer of the other half."""
    words = " ".join(f"w{i}" for i in range(size.text_tokens // 2, size.text_tokens))
    samples = [{"id": str(i), "image": pixels[i], "prompt": prompt(size), "answer": words}
               for i in range(len(pixels))]
    return model.collator()(samples)


def xllm_prompts(model: XLLM, size: Size, pixels: torch.Tensor) -> Batch:
    """A generation batch: each image after the same prompt, without an answer (as evaluation collates)."""
    samples = [{"id": str(i), "image": pixels[i], "prompt": prompt(size)} for i in range(len(pixels))]
    return model.collator(with_answers=False)(samples)


@torch.no_grad()
def hf_inputs(model: XLLM, batch: Batch) -> dict[str, torch.Tensor]:
    """transformers' inputs for the same sequences: xllm's spliced ids with the image token at the media positions
    (transformers fills them with the projected queries, in order), the same mask and labels."""
    inputs = model.splice(batch, model.encode(batch)[0])
    if not bool(inputs.attention_mask.all()):
        raise ValueError("the rows differ in length: transformers' Llama would not derive positions from the mask")
    input_ids = inputs.input_ids.masked_fill(inputs.media_positions, IMAGE_TOKEN_ID)
    return {"pixel_values": batch.media["image"], "input_ids": input_ids, "attention_mask": inputs.attention_mask,
            "labels": inputs.labels}


def step_peak_bytes(step) -> int:
    """Peak bytes allocated during ``step()`` above those allocated before it, from the torch profiler's record of
    every CPU allocation and free, in order (``profile_memory``)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_parent is None)
    running = peak = 0
    for _, change in records:
        running += change
        peak = max(peak, running)
    return peak


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
