"""Any Hugging Face causal LM as a frozen xllm LLM (Llama family, SmolLM2, Qwen, OPT, ...).

The prompt is the tokenizer's chat template (or ``prompt_template`` for a base model without one), so media
markers sit inside the user's turn exactly as the model's own chat format expects; the answer ends with the
tokenizer's end-of-sequence token, which is what such templates close an assistant turn with. A conversation
whose every answer is learned is cut from the template's own renderings of its rounds (``conversation``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.utils import GENERATION_CONFIG_NAME
from transformers.generation.streamers import BaseStreamer

from xllm.common.checkpoint import weights_elsewhere
from xllm.common.dtypes import torch_dtype
from xllm.common.paths import resolve_path
from xllm.models.llm.base import LLMBackend, LLMOutput
from xllm.models.llm.greedy import greedy_decode, plain_greedy_settings
from xllm.models.llm.label_loss import answer_loss, loss_from_logits, shifted_targets
from xllm.models.registry import register_llm
from xllm.models.sources import model_folder
from xllm.processors.batch import IGNORE_INDEX


# Config keys of transformers' causal LMs whose logits are more than ``lm_head(last_hidden_state)`` (Gemma's
# softcapping, Cohere's and Granite's scales, Falcon-H1's and MiniCPM's multipliers, ...): such a model's loss
# goes through its own forward, asked for the logits of the labelled positions only.
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                        "lm_head_multiplier", "logits_mup_width_multiplier", "scale_decoder_outputs")


class HFChatLayout:
    """The text side: chat template, tokenisation, prompt + answer + eos with labels on the answer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_template: str = "{query}\n",
                 system_prompt: str | None = None) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has no eos token; an answer would never end")
        if system_prompt is not None and tokenizer.chat_template is None:
            raise ValueError(f"llm.system_prompt={system_prompt!r}: the LLM's tokenizer has no chat template to hold "
                             "a system turn")
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.unk_token_id = tokenizer.unk_token_id

    def format_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        if self.tokenizer.chat_template is None:
            return self.rendered(history or []) + self.prompt_template.format(query=query)
        return self.tokenizer.apply_chat_template(self._messages(history or [], query), tokenize=False,
                                                  add_generation_prompt=True)

    def rendered(self, rounds: list[tuple[str, str]]) -> str:
        """The text of finished rounds, each answer closed as the template closes it. Without a chat template a
        round is ``prompt_template`` + answer + eos + newline: the eos the model learns to end an answer with is
        in the text where a later round reads that answer."""
        if self.tokenizer.chat_template is None:
            eos = self.tokenizer.eos_token
            return "".join(self.prompt_template.format(query=q) + a + eos + "\n" for q, a in rounds)
        if not rounds:
            return ""
        return self.tokenizer.apply_chat_template(self._messages(rounds), tokenize=False)

    def conversation(self, rounds: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """One row: each round's prompt text past the previous answer's eos, and its answer. Their concatenation,
        with the eos ``build_sequence`` writes after each answer, is ``rendered(rounds)`` up to the last eos, and
        up to each answer it is ``format_prompt`` of that round, what generation reads there."""
        eos = self.tokenizer.eos_token
        pieces, said = [], ""
        for index, (query, answer) in enumerate(rounds):
            prompt = self.format_prompt(query, rounds[:index])
            if not prompt.startswith(said):
                raise ValueError(f"the chat template does not render prefix-consistently: round {index}'s prompt "
                                 f"{prompt[-200:]!r} does not continue the rounds before it, which end "
                                 f"{said[-200:]!r}; the earlier answers cannot be labelled in one row")
            closed = self.rendered(rounds[: index + 1])
            if not closed.startswith(prompt + answer + eos):
                raise ValueError(f"the chat template does not write round {index}'s answer verbatim after its "
                                 f"generation prompt and close it with the eos token {eos!r}: it renders "
                                 f"{closed[max(0, len(prompt) - 50):][:250]!r}; the answer's labels would not be what "
                                 "the template shows a later round")
            pieces.append((prompt[len(said):], answer))
            said = prompt + answer + eos
        return [pieces]

    def _messages(self, rounds: list[tuple[str, str]], query: str | None = None) -> list[dict[str, str]]:
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        for past_query, past_answer in rounds:
            messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_answer}]
        if query is not None:
            messages.append({"role": "user", "content": query})
        return messages

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def build_sequence(self, prompt_ids: list[int], answer: str | None) -> tuple[list[int], list[int]]:
        answer_ids = [] if answer is None else self.tokenize(answer) + [self.eos_token_id]
        return list(prompt_ids) + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def training_attention(inputs_embeds: torch.Tensor):
    """The attention kernel for a forward that will be backpropagated. On CPU, torch's flash kernel takes about
    ten times its forward time for its backward at the lengths of these prompts (37 % of a mini stage-2 step);
    the math kernel's backward is several times faster, for the same values to fp32 rounding."""
    if inputs_embeds.device.type == "cpu" and torch.is_grad_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


@register_llm("hf_causal")
class HFCausalLM(LLMBackend):
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_prompt_length: int | None = None, overflow: str = "refuse",
                 system_prompt: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.layout = HFChatLayout(tokenizer, system_prompt=system_prompt)
        self.hidden_size = model.config.hidden_size
        self.max_prompt_length, self.overflow = max_prompt_length, overflow

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.layout.tokenizer

    @classmethod
    def from_config(cls, cfg) -> "HFCausalLM":
        # A GGUF file is read from the folder that holds it; anything else comes from its first source.
        source = str(resolve_path(cfg.path) if cfg.gguf_file else model_folder(cfg.path, "model.llm.path"))
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        if weights_elsewhere(source):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch_dtype(cfg.dtype))
            if (Path(source) / GENERATION_CONFIG_NAME).is_file():  # its defaults steer generate, as when loaded
                model.generation_config = GenerationConfig.from_pretrained(source)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(cfg.dtype), **extra)
        return cls(model, tokenizer, cfg.max_prompt_length, cfg.overflow, cfg.system_prompt)

    def forward(self, input_ids, inputs_embeds, attention_mask, labels=None) -> LLMOutput:
        # Left padding: positions count real tokens only, so a padded row computes what it would alone.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if labels is None:
            return LLMOutput(logits=self.model(**inputs).logits)
        with training_attention(inputs_embeds):
            head = self.plain_output_layer()
            if head is not None:
                hidden = self.model.base_model(**inputs).last_hidden_state
                return answer_loss(hidden, labels, head.weight, head.bias)
            rows, columns, targets = shifted_targets(labels)
            kept = columns.unique()  # a 1-D ``logits_to_keep`` keeps the same positions in every row
            logits = self.model(**inputs, logits_to_keep=kept).logits
        return loss_from_logits(logits[rows, torch.searchsorted(kept, columns)], rows, targets, labels.shape[0])

    def plain_output_layer(self) -> nn.Linear | None:
        """The output layer when the logits are exactly ``lm_head(base_model(...).last_hidden_state)`` and its
        weight is whole here (not a ZeRO-3 partition, gathered only inside the layer's own call); else None."""
        head, config = self.model.get_output_embeddings(), self.model.config
        if type(head) is not nn.Linear or self.model.base_model is self.model or hasattr(head.weight, "ds_id"):
            return None
        if any(getattr(config, key, None) is not None for key in LOGIT_TRANSFORM_KEYS):
            return None
        return head

    @torch.no_grad()
    def generate(self, input_ids, inputs_embeds, attention_mask, max_new_tokens, **generation_kwargs):
        kwargs = {"do_sample": False, "num_beams": 1, **generation_kwargs}
        eos, pad = self.layout.eos_token_id, self.layout.pad_token_id
        greedy = plain_greedy_settings(self.model, kwargs)
        if greedy is not None:
            out = greedy_decode(self.model, self.plain_output_layer(), inputs_embeds, attention_mask, max_new_tokens,
                                eos, pad, greedy.min_new_tokens or 0, kwargs.get("streamer"))
        else:
            out = self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kwargs)
        return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]

    def stream(self, input_ids, inputs_embeds, attention_mask, max_new_tokens, **generation_kwargs) -> Iterator[int]:
        # transformers streams through a streamer object that ``generate`` feeds from its own loop: run that loop
        # in a thread and hand its ids over a queue.
        ids: queue.Queue = queue.Queue()
        streamer = _IdStreamer(ids)

        def run() -> None:
            try:
                self.generate(input_ids, inputs_embeds, attention_mask, max_new_tokens, streamer=streamer,
                              **generation_kwargs)
            except Exception as error:  # handed to the caller's thread below
                streamer.error = error
                ids.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        eos = self.layout.eos_token_id
        while (token := ids.get()) is not None:
            if token == eos:
                break
            yield token
        worker.join()
        if streamer.error is not None:
            raise streamer.error


class _IdStreamer(BaseStreamer):
    """Puts each new token id of the one row on a queue, then None."""

    def __init__(self, ids: queue.Queue) -> None:
        self.ids, self.error = ids, None

    def put(self, value: torch.Tensor) -> None:
        for token in value.flatten().tolist():  # the prompt is never put: generation starts from embeddings
            self.ids.put(token)

    def end(self) -> None:
        self.ids.put(None)
