"""Image-to-text through the LLM (stage 2 image): loss on the answer tokens; evaluation by captioning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from xllm.common.registry import registry
from xllm.datasets.collate import collate
from xllm.eval.caption_metrics import caption_report


@dataclass
class StepOutput:
    """A micro-batch's mean loss and the number of units (answer tokens) it is the mean over.

    The runner back-propagates ``loss * weight`` and divides the accumulated gradients by the summed weights,
    so gradient accumulation computes exactly the mean over all answer tokens of the accumulated batch.
    """

    loss: torch.Tensor
    weight: int
    logs: dict[str, float]


@registry.register("task", "image_text")
class ImageTextTask:
    """Also serves any other modality-to-text pairing: it passes every media key of the batch to the model."""

    def __init__(self, run_cfg) -> None:
        self.cfg = run_cfg

    def train_step(self, model, batch: dict) -> StepOutput:
        out = model(batch)
        return StepOutput(out.loss, out.num_answer_tokens, {"loss": out.loss.item()})

    @torch.no_grad()
    def evaluate(self, model, dataset: Dataset, lang: str) -> tuple[dict, list[dict]]:
        """Captions every sample with greedy decoding; returns the metrics and the per-sample predictions."""
        loader = DataLoader(dataset, batch_size=self.cfg.eval_batch_size, collate_fn=collate,
                            num_workers=self.cfg.num_workers)
        references, hypotheses, rows = [], [], []
        for batch in loader:
            outputs = model.generate(batch, max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams)
            for sample_id, ref, hyp in zip(batch["id"], batch["answer"], outputs):
                references.append(ref)
                hypotheses.append(hyp)
                rows.append({"id": sample_id, "reference": ref, "prediction": hyp})
            if self.cfg.eval_max_samples is not None and len(rows) >= self.cfg.eval_max_samples:
                break
        return caption_report(references, hypotheses, lang), rows

