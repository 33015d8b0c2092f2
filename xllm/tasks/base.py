"""A task names the objective a stage optimises and how its evaluation is scored; the model computes the loss.

Training: ``train_step`` returns the mean loss of a micro-batch and the number of units it averages over; the
runner back-propagates ``loss * weight`` and divides the accumulated gradients by the summed weights, so
gradient accumulation computes exactly the mean over every unit of the accumulated batch. A mixture's batch
also logs each task's loss (``loss/<task>``), weighted by that task's units.

Evaluation is one loop for every task: predict each batch (``model.generate`` with the task's objective), then
score by the metric the dataset's config names (``xllm.eval.metrics``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from xllm.common import dist
from xllm.eval.metrics import METRICS
from xllm.processors.batch import Batch
from xllm.processors.collator import Collator
from xllm.tasks.registry import register_task

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    loss: torch.Tensor
    weight: int
    # A value, or a (value, weight) pair for one that covers part of the batch (one task's loss in a mixture).
    logs: dict[str, float | tuple[float, float]]


class Task:
    objective = "lm"

    def __init__(self, run_cfg) -> None:
        self.cfg = run_cfg

    def collator(self, model, training: bool) -> Collator:
        # Texts gathered across processes (contrastive negatives) need the same width on every rank.
        return model.collator(with_answers=training, pad_captions_to_max=dist.world_size() > 1)

    def train_step(self, model, batch: Batch) -> StepOutput:
        out = model(batch, objective=self.objective)
        logs: dict[str, float | tuple[float, float]] = dict(out.logs)
        if out.row_loss is not None:
            for task in sorted(set(batch.tasks)):
                rows = torch.tensor([t == task for t in batch.tasks], device=out.row_loss.device)
                units = float(out.row_units[rows].sum())
                logs[f"loss/{task}"] = (float(out.row_loss[rows].sum()) / max(units, 1.0), units)
        return StepOutput(out.loss, out.units, logs)

    def predict(self, model, batch: Batch) -> list:
        return model.generate(batch, objective=self.objective)

    def evaluate(self, model, loader: DataLoader, metric: str, lang: str) -> tuple[dict, list[dict]]:
        """Scores every prediction with ``metric``; returns the report and a row per sample."""
        rows = self.collect(model, loader, lang)
        score = METRICS.get(metric)
        return score([r["reference"] for r in rows], [r["prediction"] for r in rows], [r["lang"] for r in rows]), rows

    @torch.no_grad()
    def collect(self, model, loader: DataLoader, lang: str) -> list[dict]:
        """A row per sample (id, reference, prediction, language) over ``run.eval_max_samples`` samples at least
        (whole batches) or the whole split; ``lang`` is the language of samples that name none."""
        rows = []
        for batch in loader:
            for problem in batch.bad:  # dropped with on_bad_sample: skip; the split's report counts what was scored
                log.warning("evaluation skipped dataset %s record %s: %s", problem["dataset"], problem["record"],
                            problem["error"])
            if not len(batch):
                continue
            predictions = self.predict(model, batch.to(model.device))
            for sample_id, reference, prediction, sample_lang in zip(batch.ids, batch.answers, predictions,
                                                                    batch.langs):
                rows.append({"id": sample_id, "reference": reference, "prediction": prediction,
                             "lang": sample_lang or lang})
            if self.cfg.eval_max_samples is not None and len(rows) >= self.cfg.eval_max_samples:
                break
        return rows

@register_task("llm")
class LLMTask(Task):
    """Any media to text through the frozen LLM (stages 2 and 3): the LLM's answer loss; generation to score."""

    def predict(self, model, batch: Batch) -> list[str]:
        return model.generate(batch, objective=self.objective, max_new_tokens=self.cfg.max_new_tokens,
                              num_beams=self.cfg.num_beams)


@register_task("cif_asr")
class CIFSpeechTask(Task):
    """Stage 1, speech: CIF + C-Former as a CIF ASR model; greedy CIF decoding to score."""

    objective = "cif_asr"
