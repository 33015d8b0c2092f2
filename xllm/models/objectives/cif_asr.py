"""Stage 1, speech: CIF and the C-Former trained as a CIF ASR model over the LLM tokenizer's tokens.

CIF fires one vector per token of the transcript (teacher-forced count), and each adapter output is scored
against every row of the LLM's input embedding matrix by cosine similarity. So the classifier is the frozen
LLM's own vocabulary, and stage 1 teaches the interface to emit, for each spoken token, a vector pointing the
way that token's embedding points: the words the LLM reads in stage 2. The loss is the cross-entropy over
tokens plus CIF's quantity loss |sum(alpha) - token count|; decoding is greedy (CIF fires as many tokens as its
weights add up to, each token the best-scoring one). No LLM forward pass: only its embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm.models.registry import register_objective
from xllm.models.xllm import ModelOutput
from xllm.processors.batch import IGNORE_INDEX, Batch

MODALITY = "speech"
QUANTITY_WEIGHT = 1.0  # the quantity loss is in tokens per utterance, the cross-entropy in nats per token
COSINE_SCALE = 20.0  # logits = scale * cos: enough margin for a confident choice among ~1e3-1e5 tokens


def transcript_ids(batch: Batch) -> list[torch.Tensor]:
    """Each answer's token ids: its labels without the end token the layout appends."""
    rows = [row[row != IGNORE_INDEX][:-1] for row in batch.labels]
    empty = [sample_id for sample_id, row in zip(batch.ids, rows) if len(row) == 0]
    if empty:
        raise ValueError(f"utterances {empty}: their transcripts have no tokens")
    return rows


@register_objective("cif_asr")
class CIFSpeechRecognition(nn.Module):
    def _fire(self, model, batch: Batch, target_lengths: torch.Tensor | None = None):
        if MODALITY not in batch.media:
            raise ValueError(f"the cif_asr objective needs {MODALITY!r} in every batch (samples {batch.ids[:4]} ...)")
        inputs = batch.media[MODALITY]
        with torch.no_grad():  # the speech encoder is frozen in this stage
            frames, mask = model.modality(MODALITY).features(inputs)
        out = model.interfaces[MODALITY].fire(frames, mask, target_lengths)
        embeddings = model.require_llm().model.get_input_embeddings().weight
        vectors = model.adapters[MODALITY](out.hidden)
        # The LLM may be stored in bf16 (model.frozen_dtype) while the C-Former trains in fp32.
        logits = COSINE_SCALE * F.normalize(vectors, dim=-1) @ F.normalize(embeddings.to(vectors.dtype), dim=-1).T
        return out, logits

    def forward(self, model, batch: Batch) -> ModelOutput:
        targets = transcript_ids(batch)
        lengths = torch.tensor([len(t) for t in targets], device=batch.labels.device)
        out, logits = self._fire(model, batch, lengths)
        if not torch.equal(out.cif.lengths.to(lengths.device), lengths):
            raise RuntimeError(f"CIF fired {out.cif.lengths.tolist()} tokens for targets of {lengths.tolist()}")
        labels = torch.cat(targets).to(logits.device)
        cross_entropy = F.cross_entropy(logits[out.mask], labels)
        quantity = out.cif.quantity_loss
        loss = cross_entropy + QUANTITY_WEIGHT * quantity
        logs = {"loss": loss.item(), "ce": cross_entropy.item(), "quantity": quantity.item()}
        return ModelOutput(loss, int(lengths.sum()), logs)

    @torch.no_grad()
    def predict(self, model, batch: Batch, **unused) -> list[str]:
        """Greedy CIF decoding: the best token at each fired position."""
        out, logits = self._fire(model, batch)
        best = logits.argmax(-1)
        return [model.llm.decode(best[i][out.mask[i]].tolist()) for i in range(best.shape[0])]
