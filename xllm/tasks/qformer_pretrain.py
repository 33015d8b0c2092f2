"""Stage 1, image: BLIP-2's Q-Former pre-training on image-text pairs, and retrieval evaluation.

Three losses on each batch (Li et al. 2023, BLIP-2, section 3.2), summed:

- ITC, image-text contrastive: an image's score for a text is the best of its query embeddings' dot products
  with the text's [CLS] embedding (both projected and normalised), over a learnable temperature; under DDP the
  candidates are every process's batch, and gradients flow through this process's part;
- ITM, image-text matching: a binary head over the queries of a joint image-text pass, on the true pairs and
  on one hard negative per image and per text, drawn in proportion to the contrastive similarities;
- ITG, image-grounded text generation: the text branch writes the caption, seeing the queries and earlier words.

The encoder is frozen; the losses train the interface named ``image`` (``model.trainable: [interfaces.image]``).
"""

from __future__ import annotations

import torch
import torch.distributed
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from xllm.common import dist
from xllm.common.registry import registry
from xllm.datasets.collate import collate
from xllm.eval.retrieval import retrieval_report
from xllm.models.interfaces.qformer_text import QFormerWithText
from xllm.tasks.image_text import StepOutput

MODALITY = "image"
LABEL_SMOOTHING = 0.1  # BLIP-2 smooths the contrastive and the generation targets
TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP-2 clamps the learnable temperature to this range
RERANK_TOP_K = 16  # candidates per query that the matching head re-scores at evaluation


def gather_with_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated in rank order; only this process's part carries gradients."""
    if dist.world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size())]
    torch.distributed.all_gather(parts, tensor.detach().contiguous())
    parts[dist.rank()] = tensor
    return torch.cat(parts)


def text_interface(model) -> QFormerWithText:
    interface = model.interfaces[MODALITY]
    if not isinstance(interface, QFormerWithText):
        raise ValueError(f"task qformer_pretrain needs model.modalities.{MODALITY}.interface.name: qformer_text "
                         f"(the Q-Former with its text branch), got {type(interface).__name__}")
    return interface


def image_features(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():  # the encoder is frozen in every stage
        features, mask = model.encoders[MODALITY](images)
    return features, mask


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """One column per row, drawn with probability softmax(similarity) over the row's non-positive columns.

    A floor of 1e-4 (as BLIP-2's code adds) keeps a confident model's underflowed rows drawable.
    """
    weights = (similarity.float().softmax(dim=1) + 1e-4).masked_fill(positives, 0.0)
    empty = weights.sum(dim=1) == 0
    if empty.any():
        raise ValueError(f"{int(empty.sum())} rows of the batch have no negative to match against: ITM needs at "
                         "least two different captions per batch")
    return torch.multinomial(weights, 1).squeeze(1)


@registry.register("task", "qformer_pretrain")
class QFormerPretrainTask:
    def __init__(self, run_cfg) -> None:
        self.cfg = run_cfg

    def train_step(self, model, batch: dict) -> StepOutput:
        return model(batch, objective=self.objective)

    def objective(self, model, samples: dict) -> StepOutput:
        interface = text_interface(model)
        features, mask = image_features(model, samples[MODALITY])
        ids, text_mask = interface.tokenize(samples["answer"], pad_to_max=dist.world_size() > 1)
        batch = len(ids)

        # ITC
        queries = interface.image_queries(features, mask)
        image_embeds = F.normalize(interface.vision_proj(queries), dim=-1)  # [B, Q, D]
        text_embed = F.normalize(interface.text_proj(interface.text_states(ids, text_mask)[:, 0]), dim=-1)  # [B, D]
        with torch.no_grad():
            interface.temp.clamp_(*TEMPERATURE_RANGE)
        all_images, all_texts = gather_with_local_grad(image_embeds), gather_with_local_grad(text_embed)
        sim_i2t = torch.einsum("iqd,td->iqt", image_embeds, all_texts).amax(dim=1) / interface.temp
        sim_t2i = torch.einsum("td,iqd->tqi", text_embed, all_images).amax(dim=1) / interface.temp
        targets = dist.rank() * batch + torch.arange(batch, device=ids.device)
        itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
               + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2

        # ITM, with hard negatives from the whole (gathered) batch; a caption identical to the true one is no
        # negative, whichever image it came with.
        with torch.no_grad():
            all_ids, all_text_mask = gather_with_local_grad(ids), gather_with_local_grad(text_mask)
            all_features, all_mask = gather_with_local_grad(features), gather_with_local_grad(mask)
            same_caption = (ids[:, None] == all_ids[None]).all(dim=-1)  # [B, B * world]
            negative_texts = sample_hard_negatives(sim_i2t, same_caption)
            negative_images = sample_hard_negatives(sim_t2i, same_caption)
        pair_features = torch.cat([features, features, all_features[negative_images]])
        pair_mask = torch.cat([mask, mask, all_mask[negative_images]])
        pair_ids = torch.cat([ids, all_ids[negative_texts], ids])
        pair_text_mask = torch.cat([text_mask, all_text_mask[negative_texts], text_mask])
        states = interface.matching_states(pair_features, pair_mask, pair_ids, pair_text_mask)
        itm_logits = interface.itm_head(states).mean(dim=1)
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(ids.device)
        itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG
        logits = interface.generation_logits(features, mask, interface.decoder_input(ids), text_mask)
        labels = ids.masked_fill(text_mask == 0, -100)
        itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                              label_smoothing=LABEL_SMOOTHING)

        loss = itc + itm + itg
        logs = {"loss": loss.item(), "itc": itc.item(), "itm": itm.item(), "itg": itg.item()}
        return StepOutput(loss, batch, logs)

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, model, dataset: Dataset, lang: str) -> tuple[dict, list[dict]]:
        """Recall@1/5 both ways over the whole split, by contrastive similarity and after re-ranking each
        query's top candidates with the matching head (matching probability + similarity, as BLIP-2 ranks)."""
        interface = text_interface(model)
        split = self._encode_split(model, interface, dataset)
        images, texts = torch.cat(split["image_embeds"]), torch.cat(split["text_embeds"])
        similarity = torch.einsum("iqd,td->iqt", images, texts).amax(dim=1)  # cosine of the best query
        report = {"samples": len(split["id"])}
        report.update(retrieval_report(similarity, prefix="itc_"))
        i2t, t2i = self._rerank(interface, similarity, *(torch.cat(split[k]) for k in
                                                         ("features", "mask", "ids", "text_mask")))
        report.update(retrieval_report(i2t, t2i, prefix="itm_"))
        ids = split["id"]
        rows = [{"id": image_id, "best_caption_of": ids[j], "correct": image_id == ids[j]}
                for image_id, j in zip(ids, i2t.argmax(dim=1).tolist())]
        return report, rows

    def _encode_split(self, model, interface: QFormerWithText, dataset: Dataset) -> dict[str, list]:
        """Per batch: contrastive embeddings, encoder features and caption ids (for re-ranking), sample ids."""
        loader = DataLoader(dataset, batch_size=self.cfg.eval_batch_size, collate_fn=collate,
                            num_workers=self.cfg.num_workers)
        split: dict[str, list] = {k: [] for k in ("image_embeds", "text_embeds", "features", "mask", "ids",
                                                  "text_mask", "id")}
        for batch in loader:
            features, mask = image_features(model, batch[MODALITY].to(model.device))
            ids, text_mask = interface.tokenize(batch["answer"], pad_to_max=True)
            text = interface.text_states(ids, text_mask)[:, 0]
            split["image_embeds"].append(F.normalize(interface.vision_proj(interface.image_queries(features, mask)),
                                                     dim=-1))
            split["text_embeds"].append(F.normalize(interface.text_proj(text), dim=-1))
            for key, value in (("features", features), ("mask", mask), ("ids", ids), ("text_mask", text_mask)):
                split[key].append(value)
            split["id"] += batch["id"]
            if self.cfg.eval_max_samples is not None and len(split["id"]) >= self.cfg.eval_max_samples:
                break
        return split

    def _rerank(self, interface: QFormerWithText, similarity: torch.Tensor, features: torch.Tensor,
                mask: torch.Tensor, ids: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-text and text-to-image scores: each query's top-k candidates by similarity get matching
        probability + similarity, the others -inf."""
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
                states = interface.matching_states(features[images[part]], mask[images[part]], ids[texts[part]],
                                                   text_mask[texts[part]])
                probs.append(interface.itm_head(states).mean(dim=1).softmax(dim=-1)[:, 1])
            out[rows, cols] = torch.cat(probs) + scores[rows, cols]
        return i2t, t2i
