"""Speech recognition tasks: the C-Former's CIF pre-training (stage 1) and ASR through the LLM (stage 2).

Stage 1 (``cif_asr``) trains CIF, the C-Former and the speech adapter as a CIF ASR model whose tokens are the
LLM tokenizer's: CIF fires one vector per token of the transcript (teacher-forced count), and each adapter
output is scored against every row of the LLM's input embedding matrix by cosine similarity. So the
classifier is the frozen LLM's own vocabulary, and stage 1 teaches the interface to emit, for each spoken
token, a vector pointing the way that token's embedding points: the words the LLM reads in stage 2. The
loss is the cross-entropy over tokens plus CIF's quantity loss |sum(alpha) - token count|; decoding is
greedy (CIF fires as many tokens as its weights add up to, each token the best-scoring one).

Stage 2 (``asr``) is the image-text task's LLM loss on the transcript; evaluation generates with the LLM.
Both report corpus CER and WER over every utterance, an empty or missing hypothesis counting as all
deletions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from xllm.common.registry import registry
from xllm.datasets.collate import collate
from xllm.eval.asr_metrics import asr_report
from xllm.models.llm.base import LLMBackend
from xllm.tasks.image_text import ImageTextTask, StepOutput

MODALITY = "speech"
QUANTITY_WEIGHT = 1.0  # the quantity loss is in tokens per utterance, the cross-entropy in nats per token
COSINE_SCALE = 20.0  # logits = scale * cos: enough margin for a confident choice among ~1e3-1e5 tokens


def transcript_ids(llm: LLMBackend, text: str, utt_id: str) -> list[int]:
    """The LLM tokenizer's ids of a transcript; a character the tokenizer cannot spell is an error."""
    ids = llm.tokenize(text)
    unknown = getattr(llm.tokenizer, "unk_token_id", None)
    if unknown is not None and unknown in ids:
        pieces = [ch for ch in dict.fromkeys(text) if unknown in llm.tokenize(ch)]
        raise ValueError(f"utterance {utt_id!r}: the LLM's tokenizer has no token for {pieces} in {text!r}")
    if not ids:
        raise ValueError(f"utterance {utt_id!r}: the transcript {text!r} has no tokens")
    return ids


def token_logits(llm: LLMBackend, vectors: torch.Tensor) -> torch.Tensor:
    """[..., vocab] cosine scores of LLM-width vectors against the LLM's input embeddings."""
    embeddings = llm.model.get_input_embeddings().weight
    return COSINE_SCALE * F.normalize(vectors, dim=-1) @ F.normalize(embeddings, dim=-1).T


def _core(model):
    return getattr(model, "module", model)  # unwrapped from DDP/FSDP


def _langs(batch: dict, lang: str) -> list[str]:
    return [item or lang for item in batch.get("lang") or [None] * len(batch["answer"])]


@registry.register("task", "cif_asr")
class CIFASRTask:
    def __init__(self, run_cfg) -> None:
        self.cfg = run_cfg

    def _fire(self, model, batch: dict, target_lengths: torch.Tensor | None = None):
        core = _core(model)
        if batch.get(MODALITY) is None:
            raise ValueError(f"the cif_asr task needs {MODALITY!r} in every batch; got keys {sorted(batch)}")
        inputs = batch[MODALITY]
        with torch.no_grad():  # the speech encoder is frozen in this stage
            frames, mask = core.encoders[MODALITY](**inputs) if isinstance(inputs, dict) \
                else core.encoders[MODALITY](inputs)
        out = core.interfaces[MODALITY].fire(frames, mask, target_lengths)
        return out, token_logits(core.llm, core.adapters[MODALITY](out.hidden))

    def train_step(self, model, batch: dict) -> StepOutput:
        llm = _core(model).llm
        targets = [transcript_ids(llm, text, utt) for text, utt in zip(batch["answer"], batch["id"])]
        device = next(_core(model).interfaces[MODALITY].parameters()).device
        lengths = torch.tensor([len(t) for t in targets], device=device)
        out, logits = self._fire(model, batch, lengths)
        if not torch.equal(out.cif.lengths.to(lengths.device), lengths):
            raise RuntimeError(f"CIF fired {out.cif.lengths.tolist()} tokens for targets of {lengths.tolist()}")
        labels = torch.cat([torch.tensor(t) for t in targets]).to(logits.device)
        cross_entropy = F.cross_entropy(logits[out.mask], labels)
        quantity = out.cif.quantity_loss
        loss = cross_entropy + QUANTITY_WEIGHT * quantity
        return StepOutput(loss, int(lengths.sum()), {"loss": loss.item(), "ce": cross_entropy.item(),
                                                     "quantity": quantity.item()})

    @torch.no_grad()
    def transcribe(self, model, batch: dict) -> list[str]:
        """Greedy CIF decoding: the best token at each fired position."""
        out, logits = self._fire(model, batch)
        llm = _core(model).llm
        best = logits.argmax(-1)
        return [llm.decode(best[i][out.mask[i]].tolist()) for i in range(best.shape[0])]

    @torch.no_grad()
    def evaluate(self, model, dataset: Dataset, lang: str) -> tuple[dict, list[dict]]:
        return evaluate_asr(self.cfg, dataset, lang, lambda batch: self.transcribe(model, batch))


@registry.register("task", "asr")
class ASRTask(ImageTextTask):
    """Stage 2 speech: the LLM loss on the transcript (as ``image_text``); evaluation transcribes with the LLM."""

    @torch.no_grad()
    def evaluate(self, model, dataset: Dataset, lang: str) -> tuple[dict, list[dict]]:
        cfg = self.cfg
        return evaluate_asr(cfg, dataset, lang, lambda batch: model.generate(
            batch, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams))


def evaluate_asr(cfg, dataset: Dataset, lang: str, transcribe) -> tuple[dict, list[dict]]:
    """Transcribes the dataset (``run.eval_max_samples`` at most) and scores every utterance."""
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, collate_fn=collate, num_workers=cfg.num_workers)
    references, hypotheses, langs, rows = [], [], [], []
    for batch in loader:
        outputs = transcribe(batch)
        for sample_id, ref, hyp, sample_lang in zip(batch["id"], batch["answer"], outputs, _langs(batch, lang)):
            references.append(ref)
            hypotheses.append(hyp)
            langs.append(sample_lang)
            rows.append({"id": sample_id, "reference": ref, "prediction": hyp, "lang": sample_lang})
        if cfg.eval_max_samples is not None and len(rows) >= cfg.eval_max_samples:
            break
    return asr_report(references, hypotheses, langs), rows
