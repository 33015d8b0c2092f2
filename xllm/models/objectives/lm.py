"""The LLM's loss on the answers (stages 2 and 3) and generation with the LLM."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from xllm.models.registry import register_objective
from xllm.models.xllm import ModelOutput
from xllm.processors.batch import Batch


@register_objective("lm")
class LanguageModelling(nn.Module):
    """Mean cross-entropy over every answer token of the batch (the answer's end token included), computed by
    the LLM at the answer's positions only: no logits of the whole batch are formed."""

    def forward(self, model, batch: Batch):
        llm = model.require_llm()
        media, idle = model.encode(batch)
        inputs = model.splice(batch, media)
        out = llm(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask, inputs.labels)
        result = ModelOutput(out.loss + idle, int(out.row_units.sum()), {"loss": out.loss.item()})
        if batch.tasks and all(task is not None for task in batch.tasks):
            # Per-sample sums for a mixture's per-task losses; the gradient flows through the mean above only.
            result.row_loss, result.row_units = out.row_loss, out.row_units
        return result

    @torch.no_grad()
    def predict(self, model, batch: Batch, max_new_tokens: int = 40, **generation_kwargs) -> list[str]:
        llm = model.require_llm()
        inputs = model.splice(batch, model.encode(batch)[0])
        rows = llm.generate(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask, max_new_tokens,
                            **generation_kwargs)
        return [llm.decode(ids) for ids in rows]

    @torch.no_grad()
    def stream(self, model, batch: Batch, max_new_tokens: int = 40, **generation_kwargs) -> Iterator[str]:
        """The answer of a one-sample batch so far, after every new token."""
        if len(batch) != 1:
            raise ValueError(f"streaming answers one sample at a time, got {len(batch)}")
        llm = model.require_llm()
        inputs = model.splice(batch, model.encode(batch)[0])
        ids = []
        for token in llm.stream(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask, max_new_tokens,
                                **generation_kwargs):
            ids.append(token)
            yield llm.decode(ids)
