"""Stage 1, image: BLIP-2's Q-Former pre-training (``xllm.models.objectives.qformer``), scored by retrieval.

Recall@1/5 both ways over the whole split, by contrastive similarity (``itc_*``) and after re-ranking each
query's top candidates with the matching head (``itm_*``: matching probability + similarity, as BLIP-2 ranks).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from xllm.common import dist
from xllm.eval.retrieval import retrieval_report
from xllm.processors.collator import Collator
from xllm.tasks.base import Task
from xllm.tasks.registry import register_task

RERANK_TOP_K = 16  # candidates per query that the matching head re-scores


@register_task("qformer_pretrain")
class QFormerPretrainTask(Task):
    objective = "qformer_pretrain"

    def collator(self, model, training: bool) -> Collator:
        # Evaluation stacks every batch's captions into one matrix: they need one width.
        return model.collator(with_answers=training, pad_captions_to_max=not training or dist.world_size() > 1)

    @torch.no_grad()
    def evaluate(self, model, loader: DataLoader, metric: str, lang: str) -> tuple[dict, list[dict]]:
        """Retrieval over the split, whatever ``metric`` the dataset names: ranking needs every pair at once."""
        rows = self.collect(model, loader, lang)
        split = {key: torch.stack([r["prediction"][key] for r in rows]) for key in rows[0]["prediction"]}
        similarity = torch.einsum("iqd,td->iqt", split["image_embeds"], split["text_embeds"]).amax(dim=1)
        report = {"samples": len(rows)}
        report.update(retrieval_report(similarity, prefix="itc_"))
        i2t, t2i = self._rerank(model, similarity, split)
        report.update(retrieval_report(i2t, t2i, prefix="itm_"))
        ids = [r["id"] for r in rows]
        best = [{"id": image_id, "best_caption_of": ids[j], "correct": image_id == ids[j]}
                for image_id, j in zip(ids, i2t.argmax(dim=1).tolist())]
        return report, best

    def _rerank(self, model, similarity: torch.Tensor, split: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-text and text-to-image scores: each query's top-k candidates by similarity get matching
        probability + similarity, the others -inf."""
        objective = model.objectives[self.objective]
        k = min(RERANK_TOP_K, similarity.shape[1])
        i2t = torch.full_like(similarity, float("-inf"))
        t2i = torch.full_like(similarity, float("-inf"))
        for scores, out, by_image in ((similarity, i2t, True), (similarity.T, t2i, False)):
            top = scores.topk(k, dim=1).indices  # [N, k]
            rows = torch.arange(len(top), device=top.device).repeat_interleave(k)
            cols = top.flatten()
            images, texts = (rows, cols) if by_image else (cols, rows)
            probs = []
            for start in range(0, len(rows), self.cfg.eval_batch_size):
                part = slice(start, start + self.cfg.eval_batch_size)
                probs.append(objective.match_probabilities(
                    model, split["features"][images[part]], split["mask"][images[part]], split["ids"][texts[part]],
                    split["text_mask"][texts[part]]))
            out[rows, cols] = torch.cat(probs) + scores[rows, cols]
        return i2t, t2i
