"""Any Hugging Face causal LM as a frozen xllm LLM (Llama family, SmolLM2, Qwen, OPT, ...).

The prompt is the tokenizer's chat template (or ``prompt_template`` for a base model without one), so media
markers sit inside the user's turn exactly as the model's own chat format expects; the answer ends with the
tokenizer's end-of-sequence token, which is what such templates close an assistant turn with.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from xllm.common.paths import resolve_path
from xllm.common.registry import registry
from xllm.models.llm.base import IGNORE_INDEX, MEDIA_SLOT, LLMBackend

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


@registry.register("llm", "hf_causal")
class HFCausalLM(LLMBackend):
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_prompt_length: int | None = None, overflow: str = "refuse",
                 prompt_template: str = "{query}\n") -> None:
        super().__init__()
        if overflow not in ("refuse", "truncate"):
            raise ValueError(f"llm.overflow must be 'refuse' or 'truncate', got {overflow!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has no eos token; an answer would never end")
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = model.config.hidden_size
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_prompt_length = max_prompt_length
        self.overflow = overflow
        self.prompt_template = prompt_template

    @classmethod
    def from_config(cls, cfg) -> "HFCausalLM":
        folder = resolve_path(cfg.path)
        if cfg.path.startswith("zoo:") and not folder.is_dir():
            raise FileNotFoundError(f"LLM folder {folder} is missing: build the zoo (python -m xllm.zoo build tiny)")
        source = str(folder) if folder.exists() else cfg.path  # not a folder: a hub name
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(cfg.dtype), **extra)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return cls(model, tokenizer, cfg.max_prompt_length, cfg.overflow)

    # ----------------------------------------------------------------- text layout

    def format_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        if self.tokenizer.chat_template is None:
            rounds = "".join(self.prompt_template.format(query=q) + a + "\n" for q, a in history or [])
            return rounds + self.prompt_template.format(query=query)
        messages = []
        for past_query, past_answer in history or []:
            messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_answer}]
        messages.append({"role": "user", "content": query})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def build_sequence(self, prompt_ids: list[int], answer: str | None) -> tuple[list[int], list[int]]:
        prompt_ids = self._fit_prompt(prompt_ids)
        if answer is None:
            return prompt_ids, [IGNORE_INDEX] * len(prompt_ids)
        answer_ids = self.tokenize(answer) + [self.tokenizer.eos_token_id]
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    def _fit_prompt(self, prompt_ids: list[int]) -> list[int]:
        limit = self.max_prompt_length
        if limit is None or len(prompt_ids) <= limit:
            return prompt_ids
        if self.overflow == "refuse":
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds llm.max_prompt_length={limit} "
                             "(set llm.overflow=truncate to keep its end instead)")
        kept = prompt_ids[-limit:]
        if kept.count(MEDIA_SLOT) != prompt_ids.count(MEDIA_SLOT):
            raise ValueError(f"truncating a {len(prompt_ids)}-token prompt to {limit} would cut a media span")
        log.warning("prompt of %d tokens truncated to its last %d (llm.max_prompt_length)", len(prompt_ids), limit)
        return kept

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ----------------------------------------------------------------- tensors

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, input_ids, inputs_embeds, attention_mask, labels=None):
        # Left padding: positions count real tokens only, so a padded row computes what it would alone.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, labels=labels, use_cache=False)

    @torch.no_grad()
    def generate(self, input_ids, inputs_embeds, attention_mask, max_new_tokens, **generation_kwargs):
        kwargs = {"do_sample": False, "num_beams": 1, **generation_kwargs}
        out = self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.pad_token_id, **kwargs)
        rows = []
        for row in out.tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            rows.append(row)
        return rows
