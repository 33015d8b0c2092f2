"""ChatGLM-6B as the frozen LLM of X-LLM (the paper's choice).

Layout of one training row: the prompt ``问：{query}\\n答：`` (after earlier rounds,
``[Round i]\\n问：…\\n答：…\\n`` for each and then ``[Round n]\\n问：{query}\\n答：``), ``[gMASK] <sop>``, the
answer and ``<eop>``. Everything up to ``[gMASK]`` is the bidirectional context of GLM's prefix LM; ``<sop>``
starts the causal part. Labels cover the answer and ``<eop>`` only, so a conversation whose every answer is
learned takes one row per round.

Batches arrive left-padded with a 0/1 padding mask; the prefix-LM mask and 2D positions are built per row
from the ids and that mask exactly as the original tokenizer pads, so a padded row computes what it would
compute alone.
"""

from __future__ import annotations

from collections.abc import Iterator

from pathlib import Path

import torch

from xllm.common.paths import resolve_path, zoo_hint
from xllm.models.llm.base import LLMBackend, LLMOutput
from xllm.models.llm.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, build_prompt
from xllm.models.llm.label_loss import answer_loss
from xllm.models.llm.chatglm_tokenizer import ChatGLMTokenizer, clean_response
from xllm.models.registry import register_llm
from xllm.processors.batch import IGNORE_INDEX

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")


class ChatGLMLayout:
    """The text side: X-LLM's ``问：…\\n答：`` prompt, [gMASK] <sop>, the answer and <eop>."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.unk_token_id = tokenizer.unk_token_id

    def format_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        if not history:
            return f"问：{query}\n答："
        return build_prompt(query, history)

    def conversation(self, rounds: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """One row per round, after the rounds before it, as ChatGLM-6B's multi-turn fine-tuning lays out a
        conversation: everything before [gMASK] <sop> is GLM's bidirectional context, so an earlier answer
        labelled there would see the very tokens it is asked to predict."""
        return [[(self.format_prompt(query, rounds[:index]), answer)] for index, (query, answer) in enumerate(rounds)]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)

    def build_sequence(self, prompt_ids: list[int], answer: str | None) -> tuple[list[int], list[int]]:
        ids = list(prompt_ids) + [self.tokenizer.gmask_token_id, self.tokenizer.bos_token_id]
        answer_ids = [] if answer is None else self.tokenize(answer) + [self.tokenizer.eos_token_id]
        return ids + answer_ids, [IGNORE_INDEX] * len(ids) + answer_ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        # ChatGLM's own post-processing: the NFKC normaliser turned full-width punctuation into ASCII, which
        # comes back full-width next to Chinese, as the references are written.
        return clean_response(self.tokenizer.decode(ids))


@register_llm("chatglm")
class ChatGLMBackend(LLMBackend):
    def __init__(self, model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer,
                 max_prompt_length: int | None = None, overflow: str = "refuse") -> None:
        super().__init__()
        if max_prompt_length is not None and max_prompt_length < 3:
            raise ValueError(f"max_prompt_length={max_prompt_length} cannot hold a token plus [gMASK] <sop>")
        config = model.config
        mismatches = [f"{name}: config {getattr(config, name)}, tokenizer {getattr(tokenizer, name)}"
                      for name in SPECIAL_IDS if getattr(config, name) != getattr(tokenizer, name)]
        if config.vocab_size < tokenizer.vocab_size:
            mismatches.append(f"vocab_size: config {config.vocab_size} < tokenizer {tokenizer.vocab_size}")
        if mismatches:
            raise ValueError(f"ChatGLM model and tokenizer {tokenizer.model_file} disagree: {'; '.join(mismatches)}")
        self.model = model
        self.layout = ChatGLMLayout(tokenizer)
        self.tokenizer = tokenizer
        self.hidden_size = config.hidden_size
        self.max_prompt_length, self.overflow = max_prompt_length, overflow

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | str | None = None,
                        tokenizer_folder: str | Path | None = None, **kwargs) -> "ChatGLMBackend":
        """A checkpoint folder in the original layout (its ``ice_text.model`` unless ``tokenizer_folder``)."""
        model = ChatGLMForConditionalGeneration.from_pretrained(folder, torch_dtype=torch_dtype)
        tokenizer = ChatGLMTokenizer.from_pretrained(tokenizer_folder or folder)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_config(cls, cfg) -> "ChatGLMBackend":
        """The backend a config's ``model.llm`` section names (``xllm.models.config.LLMConfig``): ``path`` is a
        folder (or ``zoo:<tier>/<name>``) holding ``config.json``, the weights and ``ice_text.model``."""
        if cfg.gguf_file:
            raise ValueError(f"llm.gguf_file={cfg.gguf_file!r}: the chatglm backend reads the original checkpoint "
                             "layout (safetensors or pytorch_model*.bin), not GGUF")
        if cfg.system_prompt is not None:
            raise ValueError(f"llm.system_prompt={cfg.system_prompt!r}: ChatGLM-6B's prompt format has no system turn")
        folder = resolve_path(cfg.path)
        if not folder.is_dir():
            raise FileNotFoundError(f"llm.path {cfg.path!r}: ChatGLM checkpoint folder {folder} is missing"
                                    f"{zoo_hint(cfg.path)}")
        return cls.from_pretrained(folder, torch_dtype=cfg.dtype, max_prompt_length=cfg.max_prompt_length,
                                   overflow=cfg.overflow)

    @classmethod
    def from_random(cls, config_dict: dict, tokenizer_folder: str | Path,
                    torch_dtype: torch.dtype | str | None = None, **kwargs) -> "ChatGLMBackend":
        """A randomly initialised model of ``config_dict`` (micro models for tests)."""
        config = ChatGLMConfig.from_dict(config_dict)
        model = ChatGLMForConditionalGeneration.from_config(config, device="cpu", dtype=torch_dtype)
        return cls(model, ChatGLMTokenizer.from_pretrained(tokenizer_folder), **kwargs)

    # ----------------------------------------------------------------- tensors

    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> LLMOutput:
        # A 2D attention_mask makes the model lay out each row as the original tokenizer pads it.
        if labels is None:
            return LLMOutput(logits=self.model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                               attention_mask=attention_mask, use_cache=False).logits)
        hidden = self.model.final_hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return answer_loss(hidden, labels, self.model.transformer.word_embeddings.weight)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, num_beams: int = 1, **generation_kwargs) -> list[list[int]]:
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: the chatglm backend decodes greedily or by sampling only")
        eop = self.tokenizer.eos_token_id
        output = self.model.generate(input_ids, max_new_tokens, inputs_embeds=inputs_embeds,
                                     attention_mask=attention_mask, eos_token_id=eop, **generation_kwargs)
        return [row[: row.index(eop)] if eop in row else row for row in output[:, input_ids.shape[1]:].tolist()]

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               max_new_tokens: int, **generation_kwargs) -> Iterator[int]:
        eop = self.tokenizer.eos_token_id
        for step in self.model.iter_generate(input_ids, max_new_tokens, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, eos_token_id=eop, **generation_kwargs):
            token = int(step.tokens[0])
            if token == eop:
                return
            yield token
