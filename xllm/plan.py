"""A memory plan for a stage, computed on the meta device: nothing is allocated and no weight file is read.

``python -m xllm.plan --cfg-path configs/paper/stage2_image.yaml --gpus 8``

Per GPU, for DDP (everything replicated) and FSDP2 (everything divided by the GPUs, plus the largest layer
gathered whole, twice over for prefetching): frozen weights in ``--frozen-dtype`` (``model.frozen_dtype`` when
set), trainable weights, their gradients and AdamW's two states in fp32; and activations per sample, i.e. the
tensors autograd keeps for backward. Those are measured, not estimated: one layer of each part runs on the meta
device under saved-tensor hooks, without and with activation checkpointing (a checkpointed layer keeps its input
only), and the output layer with the loss likewise. Frozen encoders keep nothing (no gradient reaches them); the
frozen LLM keeps what the gradient flowing back to the media embeddings needs.

The model is the config's, built on the meta device: the LLM's sizes come from ``model.llm.path/config.json``, or
from ChatGLM-6B's published config when that folder is absent (the paper tier's placeholder); an encoder whose
``path`` is absent is built from its configured sizes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from xllm.common.dtypes import AMP_DTYPES, torch_dtype
from xllm.common.paths import configs_dir, resolve_path
from xllm.config import load_config
from xllm.models.builder import assemble
from xllm.models.llm.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, rotary_tables
from xllm.models.trainable import apply_trainable
from xllm.runners.parallel import shard_units

CHATGLM_6B = "models/chatglm/chatglm-6b.json"  # the published config.json, inside xllm/configs
GIB = 1024 ** 3
ADAMW_STATES = 2


class SizedLLM(nn.Module):
    """The LLM's weights where a backend would hold them (``llm.model``), without its tokenizer."""

    def __init__(self, model: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.model, self.hidden_size = model, hidden_size


def meta_model(cfg: DictConfig) -> tuple[nn.Module, ChatGLMConfig, list[str]]:
    """The config's composite on the meta device, the LLM's config, and notes on where sizes came from."""
    notes = []
    if cfg.llm.backend != "chatglm":
        raise ValueError(f"the memory plan sizes the chatglm backend (the paper tier's); model.llm.backend is "
                         f"{cfg.llm.backend!r}")
    config_file = resolve_path(cfg.llm.path) / "config.json"
    if not config_file.is_file():
        notes.append(f"{config_file} is absent: ChatGLM-6B's published sizes ({CHATGLM_6B})")
        config_file = configs_dir() / CHATGLM_6B
    llm_config = ChatGLMConfig.from_json(config_file)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for name, parts in cfg.modalities.items():
        path = parts.encoder.get("path")
        if path and not resolve_path(path).exists():
            notes.append(f"model.modalities.{name}.encoder.path {path} is absent: built from its configured sizes")
            parts.encoder.path = None
    with torch.device("meta"):
        llm = ChatGLMForConditionalGeneration(llm_config)
        model = assemble(cfg, SizedLLM(llm, llm_config.hidden_size))
    model.requires_grad_(False)
    apply_trainable(model, list(cfg.trainable))
    return model, llm_config, notes


class SavedBytes:
    """Bytes of the tensors autograd saves for backward while active, parameters (and views of them) excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {id(p) for p in model.parameters()}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in self.parameters and id(tensor) not in self.seen:
            self.seen.add(id(tensor))
            self.total += tensor.numel() * tensor.element_size()
        return tensor

    def measure(self, run) -> int:
        self.total, self.seen = 0, set()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            run()
        return self.total


def checkpointed(layer: nn.Module):
    return lambda *args, **kwargs: torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)


@dataclass
class Activations:
    """Bytes kept for backward per sample, without and with activation checkpointing."""

    plain: int
    checkpointed: int


def llm_activations(model: nn.Module, config: ChatGLMConfig, length: int, dtype: torch.dtype) -> Activations:
    """Every block of the frozen LLM, and its output layer with the loss (in fp32, as the backend computes it)."""
    llm = model.llm.model.to(dtype)  # in place: the parameters stay the ones ``SavedBytes`` leaves out
    layer = llm.transformer.layers[0]
    saved = SavedBytes(model)
    with torch.device("meta"):
        hidden = torch.empty(1, length, config.hidden_size, dtype=dtype, requires_grad=True)
        cos, sin = rotary_tables(torch.zeros(1, 2, length, dtype=torch.long), config.head_dim, dtype)
        blocked = torch.zeros(1, 1, length, length, dtype=torch.bool)
        labels = torch.zeros(1, length, dtype=torch.long)
    block = saved.measure(lambda: layer(hidden, cos, sin, blocked, None, False))
    block_checkpointed = saved.measure(lambda: checkpointed(layer)(hidden, cos, sin, blocked, None, False))
    shared_inputs = sum(t.numel() * t.element_size() for t in (cos, sin, blocked))  # once for every block
    weight = llm.transformer.word_embeddings.weight
    head = saved.measure(lambda: F.cross_entropy(F.linear(hidden, weight)[0].float(), labels[0]))
    layers = config.num_layers
    return Activations(layers * block + head,
                       layers * (block_checkpointed - shared_inputs) + shared_inputs + head)


def interface_activations(model: nn.Module, modality: str, media_tokens: int, dtype: torch.dtype) -> Activations:
    """The trainable interface's transformer layers and the adapter, for one medium."""
    interface = model.interfaces[modality]
    bert = getattr(interface, "qformer", None) or interface.bert
    layers = bert.encoder.layer
    layer = layers[0].to(dtype)
    saved = SavedBytes(model)
    width = bert.config.hidden_size
    with torch.device("meta"):
        queries = torch.empty(1, media_tokens, width, dtype=dtype, requires_grad=True)
        kwargs = {}
        if getattr(bert.config, "encoder_hidden_size", None):  # a Q-Former: cross-attention to the image features
            tokens = model.encoders[modality].model.config
            features = torch.empty(1, (tokens.image_size // tokens.patch_size) ** 2 + 1, bert.config.encoder_hidden_size,
                                   dtype=dtype)
            kwargs = {"encoder_hidden_states": features, "query_length": media_tokens}
    plain = saved.measure(lambda: layer(queries, **kwargs))
    kept = saved.measure(lambda: checkpointed(layer)(queries, **kwargs))
    adapter = model.adapters[modality].to(dtype)
    adapted = saved.measure(lambda: adapter(queries))
    return Activations(len(layers) * plain + adapted, len(layers) * kept + adapted)


def media_tokens_of(model: nn.Module, modality: str, speech_tokens: int) -> int:
    """A Q-Former's query count, else (a C-Former fires one output per token) ``speech_tokens``."""
    queries = getattr(model.interfaces[modality], "query_tokens", None)
    return queries.shape[1] if queries is not None else speech_tokens


def unit_bytes(model: nn.Module, dtype_of) -> int:
    """The largest FSDP unit (one layer), whole."""
    return max(sum(p.numel() * dtype_of(p).itemsize for p in unit.parameters()) for unit in shard_units(model))


def plan(cfg_path: str, gpus: int, frozen_dtype: str | None, text_tokens: int, speech_tokens: int) -> str:
    cfg = load_config(cfg_path)
    model, llm_config, notes = meta_model(cfg.model)
    frozen = torch_dtype(frozen_dtype or cfg.model.frozen_dtype or "bfloat16")
    activation_dtype = AMP_DTYPES.get(cfg.run.amp, torch.float32)
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen_count = sum(p.numel() for p in params if not p.requires_grad)
    llm_count = sum(p.numel() for p in {id(p): p for p in model.llm.parameters()}.values())
    modality = next(m for m in model.interfaces if any(p.requires_grad for p in model.interfaces[m].parameters()))
    media = media_tokens_of(model, modality, speech_tokens)
    length = media + text_tokens
    acts_llm = llm_activations(model, llm_config, length, activation_dtype)
    acts_interface = interface_activations(model, modality, media, activation_dtype)
    per_sample = Activations(acts_llm.plain + acts_interface.plain, acts_llm.checkpointed + acts_interface.checkpointed)
    weights = {"frozen weights": frozen_count * frozen.itemsize, "trainable weights (fp32)": trainable * 4,
               "gradients (fp32)": trainable * 4, f"AdamW states (fp32, {ADAMW_STATES})": trainable * 4 * ADAMW_STATES}
    gathered = 2 * unit_bytes(model, lambda p: torch.float32 if p.requires_grad else frozen)
    batch = cfg.run.batch_size

    columns = [("DDP", 1), ("DDP", gpus), ("FSDP", 1), ("FSDP", gpus)]
    header = f"{'per GPU (GiB)':<36}" + "".join(f"{f'{s} x{n}':>11}" for s, n in columns)
    lines = [f"{cfg_path}: {modality}, trainable {trainable:,}, frozen {frozen_count:,} (LLM {llm_count:,}) "
             f"in {str(frozen).split('.')[-1]}; activations in {str(activation_dtype).split('.')[-1]} for "
             f"{media} media + {text_tokens} text positions, run.batch_size {batch}", header, "-" * len(header)]

    def row(name: str, value) -> None:
        lines.append(f"{name:<36}" + "".join(f"{value(s, n) / GIB:>11.2f}" for s, n in columns))

    for name, size in weights.items():
        row(name, lambda s, n, size=size: size / n if s == "FSDP" else size)
    row("FSDP: largest layer gathered x2", lambda s, n: gathered if s == "FSDP" and n > 1 else 0)
    row("activations / sample", lambda s, n: per_sample.plain)
    row("activations / sample, checkpointed", lambda s, n: per_sample.checkpointed)

    def total(s, n, acts) -> float:
        kept = sum(size / n if s == "FSDP" else size for size in weights.values())
        return kept + (gathered if s == "FSDP" and n > 1 else 0) + batch * acts

    row(f"total at batch {batch}", lambda s, n: total(s, n, per_sample.plain))
    row(f"total at batch {batch}, checkpointed", lambda s, n: total(s, n, per_sample.checkpointed))
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--frozen-dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16)")
    parser.add_argument("--text-tokens", type=int, default=48, help="prompt and answer text positions per sample")
    parser.add_argument("--speech-tokens", type=int, default=64, help="C-Former outputs per utterance (one per "
                                                                      "character: ~ 5 s of Mandarin)")
    args = parser.parse_args()
    print(plan(args.cfg_path, args.gpus, args.frozen_dtype, args.text_tokens, args.speech_tokens))


if __name__ == "__main__":
    main()
