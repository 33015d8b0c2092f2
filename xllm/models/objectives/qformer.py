"""Stage 1, image: BLIP-2's Q-Former pre-training objective, and the embeddings retrieval ranks by.

Three losses on each batch (Li et al. 2023, BLIP-2, section 3.2), summed:

- ITC, image-text contrastive: an image's score for a text is the best of its query embeddings' dot products
  with the text's [CLS] embedding (both projected and normalised), over a learnable temperature; under DDP the
  candidates are every process's batch, and gradients flow through this process's part;
- ITM, image-text matching: a binary head over the queries of a joint image-text pass, on the true pairs and
  on one hard negative per image and per text, drawn in proportion to the contrastive similarities;
- ITG, image-grounded text generation: the text branch writes the caption, seeing the queries and earlier words.

The encoder is frozen; the losses train the interface named ``image`` (``model.trainable: [interfaces.image]``),
a ``qformer_text`` interface; the captions arrive tokenised by its tokenizer (``Batch.captions``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm.common import dist
from xllm.models.interfaces.qformer_text import QFormerWithText
from xllm.models.registry import register_objective
from xllm.models.xllm import ModelOutput
from xllm.processors.batch import IGNORE_INDEX, Batch

MODALITY = "image"
LABEL_SMOOTHING = 0.1  # BLIP-2 smooths the contrastive and the generation targets
TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP-2 clamps the learnable temperature to this range


def text_interface(model) -> QFormerWithText:
    interface = model.interfaces[MODALITY]
    if not isinstance(interface, QFormerWithText):
        raise ValueError(f"the qformer_pretrain objective needs model.modalities.{MODALITY}.interface.name: "
                         f"qformer_text (the Q-Former with its text branch), got {type(interface).__name__}")
    return interface


def image_features(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():  # the encoder is frozen in every stage
        return model.modality(MODALITY).features(images)


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


def captions_of(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.captions is None:
        raise ValueError("the batch holds no captions for the Q-Former's text branch: lay it out with the model's "
                         "own collator (model.collator())")
    return batch.captions["input_ids"].to(device), batch.captions["attention_mask"].to(device)


@register_objective("qformer_pretrain")
class QFormerPretraining(nn.Module):
    def forward(self, model, batch: Batch) -> ModelOutput:
        interface = text_interface(model)
        if MODALITY not in batch.media:
            raise ValueError(f"the qformer_pretrain objective needs {MODALITY!r} in every batch")
        features, mask = image_features(model, batch.media[MODALITY])
        ids, text_mask = captions_of(batch, features.device)
        size = len(ids)

        # ITC
        queries = interface.image_queries(features, mask)
        image_embeds = F.normalize(interface.vision_proj(queries), dim=-1)  # [B, Q, D]
        text_embed = F.normalize(interface.text_proj(interface.text_states(ids, text_mask)[:, 0]), dim=-1)  # [B, D]
        with torch.no_grad():
            interface.temp.clamp_(*TEMPERATURE_RANGE)
        all_images, all_texts = dist.gather(image_embeds), dist.gather(text_embed)
        sim_i2t = torch.einsum("iqd,td->iqt", image_embeds, all_texts).amax(dim=1) / interface.temp
        sim_t2i = torch.einsum("td,iqd->tqi", text_embed, all_images).amax(dim=1) / interface.temp
        targets = dist.rank() * size + torch.arange(size, device=ids.device)
        itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
               + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2

        # ITM, with hard negatives from the whole (gathered) batch; a caption identical to the true one is no
        # negative, whichever image it came with.
        with torch.no_grad():
            all_ids, all_text_mask = dist.gather(ids), dist.gather(text_mask)
            all_features, all_mask = dist.gather(features), dist.gather(mask)
            same_caption = (ids[:, None] == all_ids[None]).all(dim=-1)  # [B, B * world]
            negative_texts = sample_hard_negatives(sim_i2t, same_caption)
            negative_images = sample_hard_negatives(sim_t2i, same_caption)
        pair_features = torch.cat([features, features, all_features[negative_images]])
        pair_mask = torch.cat([mask, mask, all_mask[negative_images]])
        pair_ids = torch.cat([ids, all_ids[negative_texts], ids])
        pair_text_mask = torch.cat([text_mask, all_text_mask[negative_texts], text_mask])
        states = interface.matching_states(pair_features, pair_mask, pair_ids, pair_text_mask)
        itm_logits = interface.itm_head(states).mean(dim=1)
        itm_labels = torch.cat([torch.ones(size), torch.zeros(2 * size)]).long().to(ids.device)
        itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG
        logits = interface.generation_logits(features, mask, interface.decoder_input(ids), text_mask)
        labels = ids.masked_fill(text_mask == 0, IGNORE_INDEX)
        itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                              label_smoothing=LABEL_SMOOTHING)
        # Rescaled to the mean over the global batch's tokens (every rank's), times the world size: the runner
        # averages the ranks' losses, so several processes compute what one holding the whole batch would (the
        # factor is exactly 1 in one process).
        tokens = float((labels[:, 1:] != IGNORE_INDEX).sum())
        itg = itg * (tokens * dist.world_size() / max(dist.all_reduce_sum(tokens), 1.0))

        loss = itc + itm + itg
        logs = {"loss": loss.item(), "itc": itc.item(), "itm": itm.item(), "itg": itg.item()}
        return ModelOutput(loss, size, logs)

    @torch.no_grad()
    def predict(self, model, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Per sample, what retrieval ranks by: the normalised query and caption embeddings, and the encoder
        features and caption ids the matching head re-scores candidates with."""
        interface = text_interface(model)
        features, mask = image_features(model, batch.media[MODALITY])
        ids, text_mask = captions_of(batch, features.device)
        text = interface.text_states(ids, text_mask)[:, 0]
        image_embeds = F.normalize(interface.vision_proj(interface.image_queries(features, mask)), dim=-1)
        text_embeds = F.normalize(interface.text_proj(text), dim=-1)
        return [{"image_embeds": image_embeds[i], "text_embeds": text_embeds[i], "features": features[i],
                 "mask": mask[i], "ids": ids[i], "text_mask": text_mask[i]} for i in range(len(ids))]

    @torch.no_grad()
    def match_probabilities(self, model, features: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                            text_mask: torch.Tensor) -> torch.Tensor:
        """The matching head's probability that each (image, caption) pair belongs together."""
        interface = text_interface(model)
        states = interface.matching_states(features, mask, ids, text_mask)
        return interface.itm_head(states).mean(dim=1).softmax(dim=-1)[:, 1]
