"""Native ChatGLM-6B (v1, the GLM architecture) for current PyTorch, loading the original checkpoint layout.

What it computes follows the original modelling code, quirks included (``shared/specs/chatglm6b.md``):

- every block scales its residual by alpha = sqrt(2 * 28), whatever ``num_layers`` says, because the original
  blocks are never told the layer count; and the residual adds the *normalised* input:
  x' = alpha * LN(x) + Attn(LN(x));
- rotary frequencies are rounded to fp16 once, in every dtype; rotary is 2D: the first half of each head
  turns with the position id, the second half with the block position id, both in the half-split layout;
- the fused qkv projection is interleaved per head ([heads, (q, k, v), head_dim]), not [all q; all k; all v];
- layer l scores with q / (sqrt(d) * (l + 1)), fills masked scores with -10000 and multiplies by (l + 1) in
  an fp32 softmax, so a fully masked (left pad) row attends uniformly instead of producing NaN;
- the output matrix is ``word_embeddings.weight``: the original runtime ties ``lm_head`` to it after loading,
  so a stored ``lm_head.weight`` is never read (a mismatch is logged);
- the MLP is a tanh-GELU.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from xllm.common.checkpoint import CheckpointError, load_state, read_weights, weights_elsewhere
from xllm.common.dtypes import DTYPES, torch_dtype
from xllm.processors.batch import IGNORE_INDEX
from xllm.models.llm.chatglm_tokenizer import ChatGLMTokenizer, build_prompt, clean_response, prefix_lm_layout

log = logging.getLogger(__name__)

RESIDUAL_ALPHA = math.sqrt(2 * 28)
MASK_FILL = -10000.0
ROTARY_BASE = 10000.0
INVALID_SCORE_FALLBACK_ID = 5  # "▁": what the original chat emits when the scores hold NaN or inf
LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]
KeyValue = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- configuration


@dataclass
class ChatGLMConfig:
    """The fields of ChatGLM-6B's ``config.json``. Sizes and special ids have no defaults on purpose: the
    original class defaults predate the slimmed vocabulary and are wrong for the released checkpoint."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    inner_hidden_size: int
    bos_token_id: int
    eos_token_id: int
    mask_token_id: int
    gmask_token_id: int
    pad_token_id: int
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048  # stored only: there is no position table, rotary angles grow on demand
    position_encoding_2d: bool = True
    use_cache: bool = True
    extra: dict = field(default_factory=dict)  # every other key of config.json, written back on save

    @classmethod
    def from_dict(cls, data: dict, source: str = "ChatGLM config") -> "ChatGLMConfig":
        own = [f for f in fields(cls) if f.name != "extra"]
        missing = [f.name for f in own if f.default is MISSING and f.name not in data]
        if missing:
            raise ValueError(f"{source} lacks required keys: {', '.join(missing)}")
        unsupported = []
        if not data.get("position_encoding_2d", True):
            unsupported.append("position_encoding_2d=false (1D positions)")
        if data.get("pre_seq_len") is not None:
            unsupported.append(f"pre_seq_len={data['pre_seq_len']} (P-tuning prefixes)")
        if data.get("quantization_bit"):
            unsupported.append(f"quantization_bit={data['quantization_bit']}")
        if unsupported:
            raise NotImplementedError(f"{source}: unsupported settings: {'; '.join(unsupported)}")
        names = {f.name for f in own}
        config = cls(**{k: v for k, v in data.items() if k in names},
                     extra={k: v for k, v in data.items() if k not in names})
        head_dim, rest = divmod(config.hidden_size, config.num_attention_heads)
        if rest or head_dim % 4:
            raise ValueError(f"{source}: hidden_size {config.hidden_size} / num_attention_heads "
                             f"{config.num_attention_heads} must give a head size divisible by 4 (2D rotary)")
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "ChatGLMConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ChatGLM config not found: {path}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))

    def to_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **own}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def resolve_dtype(dtype: torch.dtype | str | None, config: ChatGLMConfig) -> torch.dtype:
    """None means float32; "auto" means the config's ``torch_dtype``."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = config.extra.get("torch_dtype") or "float32"
    if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; known: {', '.join(DTYPES)}")
    return torch_dtype(dtype)


# --------------------------------------------------------------------------- outputs and cache


@dataclass
class ChatGLMCache:
    """Keys (after rotary) and values of every layer, plus what the next token's mask and position follow
    from: the newest token's mask row and its (position, block position)."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer, each [batch, heads, seq, head_dim]
    last_mask_row: torch.Tensor  # [batch, 1, 1, seq] bool, True = blocked
    last_positions: torch.Tensor  # [batch, 2]

    @property
    def seq_length(self) -> int:
        return self.last_mask_row.shape[-1]

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The original layout: per layer (keys, values), each [seq, batch, heads, head_dim]."""
        return tuple((k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)) for k, v in self.layers)


@dataclass
class ChatGLMOutput:
    logits: torch.Tensor  # [batch, seq, vocab] in the model dtype
    past_key_values: ChatGLMCache | None = None
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # input of every layer, then the final-LN output
    attentions: tuple[torch.Tensor, ...] | None = None  # softmax probabilities [batch, heads, sq, sk]


@dataclass
class GenerationStep:
    tokens: torch.Tensor  # [batch] chosen ids; rows that already ended get the pad id
    logits: torch.Tensor  # [batch, vocab] raw next-token logits the tokens were chosen from


# --------------------------------------------------------------------------- rotary embedding


def rotary_frequencies(rotary_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """omega_j = 10000^(-2j / rotary_dim), rounded to fp16 as the original stores them (returned as fp32)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return (1.0 / ROTARY_BASE**exponents).half().float()


def rotary_tables(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [batch, seq, 1, head_dim] for 2D positions [batch, 2, seq]."""
    # An fp16 model forms its angles in fp16, as the original deployment (.half()) does.
    angle_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    omega = rotary_frequencies(head_dim // 2, position_ids.device).to(angle_dtype)
    angles = position_ids.to(angle_dtype)[..., None] * omega  # [batch, 2, seq, head_dim / 4]
    angles = torch.cat((angles, angles), dim=-1).transpose(1, 2).flatten(2)  # [batch, seq, head_dim]
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, seq, heads, head_dim]: in each half, dims j and j + head_dim/4 form one pair."""
    first, second = x.unflatten(-1, (2, 2, x.shape[-1] // 4)).unbind(-2)
    rotated = torch.stack((-second, first), dim=-2).flatten(-3)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- layers


class GLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # The original divides q by this to keep fp16 scores in range and multiplies it back in the fp32
        # softmax, which makes a masked score -10000 * coeff.
        self.scaling_coeff = float(layer_idx + 1)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocked: torch.Tensor | None,
                past: KeyValue | None, eager: bool) -> tuple[torch.Tensor, KeyValue, torch.Tensor | None]:
        """``blocked``: bool [b, 1, s, keys] (True = masked) or None; ``past``: cached (keys, values)."""
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        if eager:
            context, probs = self._explicit(q, k, v, blocked)
        else:
            context, probs = self._sdpa(q, k, v, blocked), None
        out = self.dense(context.transpose(1, 2).reshape(batch, length, -1))
        return out, (k, v), probs

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (q / (math.sqrt(self.head_dim) * self.scaling_coeff)) @ k.transpose(-1, -2)
        if blocked is not None:
            scores = scores.masked_fill(blocked, MASK_FILL)
        probs = torch.softmax(scores.float() * self.scaling_coeff, dim=-1).to(v.dtype)
        return probs @ v, probs

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        if blocked is None:
            return F.scaled_dot_product_attention(q, k, v)
        # The explicit path's masked score; fp16 cannot hold it, and any fill this low gives the same softmax.
        fill = max(MASK_FILL * self.scaling_coeff, torch.finfo(q.dtype).min / 2)
        bias = torch.zeros(blocked.shape, dtype=q.dtype, device=q.device).masked_fill(blocked, fill)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # A fully masked row softmaxes equal scores in the explicit path: uniform weights, the mean value.
        fully_blocked = blocked.all(dim=-1, keepdim=True)
        return torch.where(fully_blocked, v.mean(dim=-2, keepdim=True), context)


class GLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLMMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocked: torch.Tensor | None,
                past: KeyValue | None, eager: bool) -> tuple[torch.Tensor, KeyValue, torch.Tensor | None]:
        normed = self.input_layernorm(x)
        attended, present, probs = self.attention(normed, cos, sin, blocked, past, eager)
        x = RESIDUAL_ALPHA * normed + attended
        normed = self.post_attention_layernorm(x)
        return RESIDUAL_ALPHA * normed + self.mlp(normed), present, probs


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


# --------------------------------------------------------------------------- the model


class ChatGLMForConditionalGeneration(nn.Module):
    """ChatGLM-6B with the original parameter names (``transformer.*``; the output layer is tied)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GLMTransformer(config)
        self.attn_implementation = "sdpa"  # "eager" computes the scores explicitly (always for output_attentions)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict = {"use_reentrant": False}

    @classmethod
    def from_config(cls, config: ChatGLMConfig | dict, device: str | torch.device = "meta",
                    dtype: torch.dtype | str | None = None) -> "ChatGLMForConditionalGeneration":
        """A model of ``config`` on ``device``: "meta" allocates nothing; a real device gets PyTorch's
        default random initialisation."""
        if isinstance(config, dict):
            config = ChatGLMConfig.from_dict(config)
        with torch.device(device):
            model = cls(config)
        return model.to(resolve_dtype(dtype, config))

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's activations in backward while training, with ``torch.utils.checkpoint``'s
        ``activation_checkpointing_kwargs`` (non-reentrant by default); the name and argument transformers give
        the same switch."""
        self.gradient_checkpointing = True
        self.checkpoint_kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}

    def layout(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix-LM mask [b, 1, s, s] (True = blocked) and 2D positions [b, 2, s] of (left-padded) rows."""
        c = self.config
        return prefix_lm_layout(input_ids, padding_mask, mask_token_id=c.mask_token_id,
                                gmask_token_id=c.gmask_token_id, bos_token_id=c.bos_token_id)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: ChatGLMCache | None = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> ChatGLMOutput:
        """``attention_mask`` is either the bool prefix-LM mask [b, 1, s, s] (True = blocked; with a cache, its
        last rows are used) or a padding mask [b, s] (1 = token, 0 = left pad) from which mask and positions
        are built as the original tokenizer pads. Whatever of mask and ``position_ids`` [b, 2, s] is not given
        is built from ``input_ids`` (as unpadded rows unless a padding mask is given), which serve that purpose
        also when ``inputs_embeds`` carry the actual inputs. With a cache and no explicit mask or positions,
        new tokens continue the newest cached token: same position, block position + 1, and they see what it
        saw plus themselves."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, presents, layout, hidden_states, attentions = self._run(
            input_ids, position_ids, attention_mask, past_key_values, use_cache, inputs_embeds,
            output_hidden_states, output_attentions)
        logits = F.linear(hidden, self.transformer.word_embeddings.weight)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        cache = None
        if presents is not None:
            blocked, position_ids = layout
            cache = ChatGLMCache(presents, blocked[:, :, -1:], position_ids[:, :, -1])
        return ChatGLMOutput(logits=logits, past_key_values=cache, loss=loss, hidden_states=hidden_states,
                             attentions=attentions)

    def final_hidden_states(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None,
                            inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The final layer norm's output [b, s, hidden], which the tied output matrix turns into logits; inputs as
        in ``forward`` (without a cache): what a loss read at a few positions starts from."""
        return self._run(input_ids, position_ids, attention_mask, None, False, inputs_embeds, False, False)[0]

    def _run(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
             attention_mask: torch.Tensor | None, past_key_values: ChatGLMCache | None, use_cache: bool,
             inputs_embeds: torch.Tensor | None, output_hidden_states: bool, output_attentions: bool):
        """(final hidden states, per-layer (keys, values) or None, (mask, positions), hidden states, attentions)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.transformer.word_embeddings(input_ids)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        use_cache = use_cache and not checkpointing  # training recomputes blocks; there is nothing to decode
        blocked, position_ids = self._layout(input_ids, inputs_embeds, attention_mask, position_ids,
                                             past_key_values)
        cos, sin = rotary_tables(position_ids, self.config.head_dim, inputs_embeds.dtype)
        attend_mask = blocked if bool(blocked.any()) else None
        eager = output_attentions or self.attn_implementation == "eager"

        hidden = inputs_embeds
        presents, hidden_states, attentions = [], [], []
        for i, layer in enumerate(self.transformer.layers):
            if output_hidden_states:
                hidden_states.append(hidden)
            past = None if past_key_values is None else past_key_values.layers[i]
            run = partial(checkpoint, layer, **self.checkpoint_kwargs) if checkpointing else layer
            hidden, present, probs = run(hidden, cos, sin, attend_mask, past, eager)
            presents.append(present)
            attentions.append(probs)
        hidden = self.transformer.final_layernorm(hidden)
        hidden_states.append(hidden)
        return (hidden, tuple(presents) if use_cache else None, (blocked, position_ids),
                tuple(hidden_states) if output_hidden_states else None,
                tuple(attentions) if output_attentions else None)

    def _layout(self, input_ids: torch.Tensor | None, inputs: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, past: ChatGLMCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and positions for ``inputs`` (ids or embeddings [b, s, ...]), as ``forward`` describes."""
        batch, length = inputs.shape[:2]
        device = inputs.device
        full_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if past is None:
            if full_mask is None or position_ids is None:
                if input_ids is None:
                    raise ValueError("without input_ids, pass attention_mask [b, 1, s, s] and position_ids "
                                     "[b, 2, s]: the prefix-LM layout is found from the [gMASK]/<sop> ids")
                built_mask, built_positions = self.layout(input_ids, padding)
                full_mask = built_mask if full_mask is None else full_mask
                position_ids = built_positions if position_ids is None else position_ids
            return full_mask.to(device=device, dtype=torch.bool), position_ids.to(device)

        total = past.seq_length + length
        if full_mask is not None:
            blocked = full_mask[..., -length:, :].to(device=device, dtype=torch.bool)
        else:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
            blocked = torch.cat((past.last_mask_row.expand(batch, 1, length, past.seq_length),
                                 causal.expand(batch, 1, length, length)), dim=-1)
            if padding is not None:
                blocked = blocked | ~padding.to(device=device, dtype=torch.bool)[:, None, None, :]
        if blocked.shape[-1] != total:
            raise ValueError(f"attention_mask covers {blocked.shape[-1]} keys, but cache + input hold {total}")
        if position_ids is None:
            last = past.last_positions
            steps = torch.arange(1, length + 1, device=device)
            position_ids = torch.stack((last[:, :1].expand(batch, length), last[:, 1:] + steps), dim=1)
        return blocked, position_ids[..., -length:].to(device)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def iter_generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, inputs_embeds: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      eos_token_id: int | Sequence[int] | None = None, use_cache: bool = True,
                      logits_processors: Sequence[LogitsProcessor] = (),
                      generator: torch.Generator | None = None) -> Iterator[GenerationStep]:
        """One ``GenerationStep`` per new token until every row has emitted an eos id or ``max_new_tokens``.

        ``use_cache=False`` recomputes the whole sequence at every step (the original's no-cache path): the
        mask and positions then grow as the original extends them."""
        if max_new_tokens <= 0:
            return
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        if attention_mask is not None or position_ids is not None:
            attention_mask, position_ids = self._layout(input_ids, input_ids, attention_mask, position_ids, None)

        ids, embeds = input_ids, inputs_embeds
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = self(ids, position_ids, attention_mask, inputs_embeds=embeds, use_cache=use_cache)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1]
            tokens = choose_tokens(logits, logits_processors, do_sample, temperature, top_k, top_p, generator)
            tokens = torch.where(finished, self.config.pad_token_id, tokens)
            finished |= torch.isin(tokens, eos_ids)
            yield GenerationStep(tokens, logits)
            if bool(finished.all()) or step == max_new_tokens - 1:
                return
            new = tokens[:, None]
            if use_cache:
                out = self(new, past_key_values=out.past_key_values, use_cache=True)
                continue
            ids = torch.cat((ids, new), dim=1)
            if embeds is not None:
                embeds = torch.cat((embeds, self.transformer.word_embeddings(new)), dim=1)
            if attention_mask is not None:
                attention_mask, position_ids = extend_layout(attention_mask, position_ids)
            out = self(ids, position_ids, attention_mask, inputs_embeds=embeds, use_cache=False)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Prompt + new ids [batch, prompt + new]; greedy unless ``do_sample``; see ``iter_generate``."""
        steps = [step.tokens for step in self.iter_generate(input_ids, max_new_tokens, **kwargs)]
        if not steps:
            return input_ids
        return torch.cat((input_ids, torch.stack(steps, dim=1)), dim=1)

    # ------------------------------------------------------------------ chat

    def _chat_input(self, tokenizer: ChatGLMTokenizer, query: str, history: list[tuple[str, str]],
                    max_length: int, overflow: str) -> torch.Tensor:
        if overflow not in ("refuse", "truncate"):
            raise ValueError(f"overflow must be 'refuse' or 'truncate', got {overflow!r}")
        ids = tokenizer.encode(build_prompt(query, history))
        if len(ids) >= max_length:
            if overflow == "refuse":
                raise ValueError(f"the chat prompt has {len(ids)} tokens, which leaves no room for an answer "
                                 f"within max_length={max_length} (overflow='truncate' keeps its end)")
            log.warning("chat prompt of %d tokens truncated to its last %d (max_length=%d)",
                        len(ids), max_length - 1, max_length)
            ids = ids[-(max_length - 1):]
        return torch.tensor([ids], device=self.device)

    def stream_chat(self, tokenizer: ChatGLMTokenizer, query: str, history: list[tuple[str, str]] | None = None,
                    max_length: int = 2048, do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
                    top_k: int = 50, overflow: str = "refuse",
                    generator: torch.Generator | None = None) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Yields (response so far, history with it) after every generated token; ``max_length`` counts the
        prompt. A prompt that leaves no room is refused (``overflow="refuse"``) or cut to its end
        (``"truncate"``, with a warning)."""
        history = list(history or [])
        input_ids = self._chat_input(tokenizer, query, history, max_length, overflow)
        new_ids: list[int] = []
        steps = self.iter_generate(
            input_ids, max_length - input_ids.shape[1], do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
            logits_processors=[invalid_score_processor], generator=generator,
        )
        for step in steps:
            token = int(step.tokens[0])
            if token != tokenizer.eos_token_id:
                new_ids.append(token)
            response = clean_response(tokenizer.decode(new_ids))
            yield response, history + [(query, response)]

    def chat(self, tokenizer: ChatGLMTokenizer, query: str, history: list[tuple[str, str]] | None = None,
             **kwargs) -> tuple[str, list[tuple[str, str]]]:
        """(response, history + [(query, response)]) with the original chat defaults: ``stream_chat``'s last step."""
        last = ("", list(history or []) + [(query, "")])
        for last in self.stream_chat(tokenizer, query, history, **kwargs):
            pass
        return last

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | str | None = None
                        ) -> "ChatGLMForConditionalGeneration":
        """Load ``config.json`` and the original weights from ``model.safetensors[.index.json]`` or
        ``pytorch_model.bin[.index.json]`` (in that order of preference). Every mismatch with the config is
        reported at once. ``torch_dtype``: None = float32, "auto" = the config's, or a dtype."""
        folder = Path(folder)
        config = ChatGLMConfig.from_json(folder / "config.json")
        dtype = resolve_dtype(torch_dtype, config)
        if weights_elsewhere(folder):
            return cls.from_config(config, device="cpu", dtype=dtype)
        model = cls.from_config(config, device="meta")
        lm_head = read_checkpoint(folder, model, config, dtype)
        embeddings = model.transformer.word_embeddings.weight
        if lm_head is not None and not torch.equal(lm_head.to(dtype), embeddings):
            difference = (lm_head.to(dtype).float() - embeddings.float()).abs().max().item()
            log.warning("%s: lm_head.weight differs from transformer.word_embeddings.weight (max |diff| %.3g); "
                        "like the original runtime, the output layer uses word_embeddings", folder, difference)
        return model

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors in the original layout: the model's own, the rotary buffers and a separate lm_head."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        frequencies = rotary_frequencies(self.config.head_dim // 2, self.device)
        for i in range(self.config.num_layers):
            state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = frequencies.clone()
        state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
        return state

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True,
                        max_shard_size: int | None = None) -> None:
        """Write ``config.json`` and the weights in the original key layout, as safetensors or as
        ``pytorch_model*.bin``; with ``max_shard_size`` (bytes) in shards with an index."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype_name = str(self.dtype).removeprefix("torch.")
        config = {**self.config.to_dict(), "torch_dtype": dtype_name}
        if "dtype" in config:  # newer transformers write this key too; it must not contradict the weights
            config["dtype"] = dtype_name
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_checkpoint(folder, self.checkpoint_state_dict(), safe_serialization, max_shard_size)


# --------------------------------------------------------------------------- generation helpers


def extend_layout(blocked: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout after one more token, as the original grows it: old rows cannot see the new token, the new
    row sees what the previous last row saw plus itself, and its block position goes up by one."""
    batch, _, length, _ = blocked.shape
    hidden_from_old = torch.ones(batch, 1, length, 1, dtype=torch.bool, device=blocked.device)
    new_row = torch.cat((blocked[:, :, -1:], torch.zeros_like(hidden_from_old[:, :, :1])), dim=-1)
    blocked = torch.cat((torch.cat((blocked, hidden_from_old), dim=-1), new_row), dim=-2)
    new_position = position_ids[:, :, -1:] + torch.tensor([0, 1], device=position_ids.device)[None, :, None]
    return blocked, torch.cat((position_ids, new_position), dim=-1)


def invalid_score_processor(scores: torch.Tensor) -> torch.Tensor:
    """The original chat's guard: NaN or inf anywhere turns the scores into a certain "▁"."""
    if bool(torch.isnan(scores).any() or torch.isinf(scores).any()):
        scores = torch.zeros_like(scores)
        scores[..., INVALID_SCORE_FALLBACK_ID] = 5e4
    return scores


def sampling_warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' temperature, top-k and top-p warpers, each only when it changes something and in the order
    its ``generate`` applies them (4.27, which the original chat ran on, has the same order)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def choose_tokens(logits: torch.Tensor, processors: Sequence[LogitsProcessor], do_sample: bool,
                  temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [batch]: processors, then the argmax, or (when sampling) a draw after ``sampling_warpers``."""
    scores = logits.float()
    for processor in processors:
        scores = processor(scores)
    if not do_sample:
        return scores.argmax(dim=-1)
    # These warpers read only the scores, never the ids generated so far.
    scores = sampling_warpers(temperature, top_k, top_p)(None, scores)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- checkpoint files


ChatGLMCheckpointError = CheckpointError  # a checkpoint that does not fit its config


def read_checkpoint(folder: Path, model: nn.Module, config: ChatGLMConfig, dtype: torch.dtype) -> torch.Tensor | None:
    """Loads the folder's weights into ``model`` (built on the meta device) in ``dtype``; returns the stored
    ``lm_head.weight`` (None if absent), which the original ties to the embedding. One error lists missing shards,
    missing and unexpected keys and wrong shapes."""
    weights = read_weights(folder)
    state = weights.tensors
    problems = list(weights.problems)
    # Recomputed buffers the original also ignores on load, and the output matrix that it ties.
    for i in range(config.num_layers):
        state.pop(f"transformer.layers.{i}.attention.rotary_emb.inv_freq", None)
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and tuple(lm_head.shape) != (config.vocab_size, config.hidden_size):
        problems.append(f"lm_head.weight in {weights.origin['lm_head.weight']} has shape {list(lm_head.shape)}, "
                        f"the model needs {[config.vocab_size, config.hidden_size]}")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_state(model, state, f"{folder} (config.json)", origin=weights.origin, problems=problems, assign=True)
    return lm_head


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], safe_serialization: bool,
                     max_shard_size: int | None) -> None:
    stem, suffix = ("model", ".safetensors") if safe_serialization else ("pytorch_model", ".bin")
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=stem + "{suffix}" + suffix,
                                               max_shard_size=math.inf if max_shard_size is None else max_shard_size)
    for name, keys in split.filename_to_tensors.items():
        shard = {key: tensors[key] for key in keys}
        if safe_serialization:
            save_file(shard, folder / name, metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / f"{stem}{suffix}.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- size


@dataclass
class ParameterReport:
    parameters: int  # of the model as it runs: the output matrix is the (tied) embedding
    embedding_parameters: int

    @property
    def checkpoint_parameters(self) -> int:
        """Counting the checkpoint's separate lm_head.weight as well."""
        return self.parameters + self.embedding_parameters

    def memory_bytes(self, dtype: torch.dtype) -> int:
        return self.parameters * dtype.itemsize


def parameter_report(model: ChatGLMForConditionalGeneration) -> ParameterReport:
    """Counts work on the meta device, so the 6B configuration can be sized without allocating it."""
    unique = {id(p): p for p in model.parameters()}
    return ParameterReport(
        parameters=sum(p.numel() for p in unique.values()),
        embedding_parameters=model.transformer.word_embeddings.weight.numel(),
    )
