"""Any media to text, alone or as a stage-3 mixture: the LLM loss, per-task losses, and per-dataset metrics.

Training logs the loss of each task in a batch (samples carry a ``task`` field in a mixture) as
``loss/<task>``, each weighted by that task's answer tokens so the runner averages it correctly over a logging
window. Evaluation generates an answer per sample and scores with the dataset's own ``report`` (motion
direction for videos, command accuracy for device status) when it has one, caption metrics otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from xllm.common.registry import registry
from xllm.models.llm.base import IGNORE_INDEX
from xllm.tasks.image_text import ImageTextTask, StepOutput


def per_sample_loss(model, samples: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LLM's mean answer loss, and each row's summed token loss and answer-token count."""
    media = model.encode_media(samples)
    batch = model.assemble(samples, media, with_answers=True)
    out = model.llm(batch.input_ids, model.embed(batch, media), batch.attention_mask, batch.labels)
    labels = batch.labels[:, 1:]
    losses = F.cross_entropy(out.logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX,
                             reduction="none")
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    return out.loss, losses.sum(dim=1), counts


@registry.register("task", "multitask")
class MultiTask(ImageTextTask):
    def train_step(self, model, batch: dict) -> StepOutput:
        tasks = batch.get("task")
        if not tasks or any(t is None for t in tasks):
            return super().train_step(model, batch)
        loss, row_sums, row_counts = model(batch, objective=per_sample_loss)
        row_sums = row_sums.detach()
        weight = int(row_counts.sum())
        logs: dict[str, float | tuple[float, float]] = {"loss": loss.item()}
        for task in sorted(set(tasks)):
            rows = torch.tensor([t == task for t in tasks], device=row_sums.device)
            tokens = float(row_counts[rows].sum())
            logs[f"loss/{task}"] = (float(row_sums[rows].sum()) / max(tokens, 1.0), tokens)
        return StepOutput(loss, weight, logs)

    @torch.no_grad()
    def evaluate(self, model, dataset: Dataset, lang: str) -> tuple[dict, list[dict]]:
        report, rows = super().evaluate(model, dataset, lang)
        score = getattr(dataset, "report", None)
        if score is None:
            return report, rows
        return score([r["reference"] for r in rows], [r["prediction"] for r in rows], lang), rows
