"""Each record's length and modality, read without decoding media, for grouping training batches by length.

A dataset whose samples vary in length gives ``lengths()``: one number per record, the size of what a batch of
its samples is padded along, in the dataset's own unit: seconds of audio for speech (the manifest's
``duration``, else the file's header), steps for signals, text units otherwise (images and a video's frames
are of one size, so what varies is the text). Its ``modality`` (or ``modalities()``, one per record) names
the media its samples carry. Batches are grouped by modality first, so lengths are only ever compared within
one modality, where they share a unit.

Fallback: a dataset without ``lengths()`` counts as all of one length, so its batches are grouped by modality
only (a warning names it); one without ``modality`` counts as one modality of its own.
"""

from __future__ import annotations

import logging
import re

from torch.utils.data import ConcatDataset, Dataset

log = logging.getLogger(__name__)

# A CJK character, or a run of other non-space characters (a word with its punctuation).
TEXT_UNIT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\s\u3040-\u30ff\u3400-\u4dbf"
                       r"\u4e00-\u9fff\uac00-\ud7af]+")


def text_length(text: str) -> int:
    """About the number of tokens a text becomes, without the LLM's tokenizer (the data layer holds none):
    words count one each, and so does each Chinese, Japanese or Korean character, which tokenizers keep apart
    where they put a whole English word in one or two tokens."""
    return len(TEXT_UNIT.findall(text))


def record_lengths(dataset: Dataset) -> list[float]:
    """One length per record of ``dataset`` (a concatenation: its parts' in turn); the fallback above."""
    if isinstance(dataset, ConcatDataset):
        return [length for part in dataset.datasets for length in record_lengths(part)]
    if not hasattr(dataset, "lengths"):
        log.warning("%s gives no record lengths: its batches are grouped by modality only",
                    getattr(dataset, "name", type(dataset).__name__))
        return [0.0] * len(dataset)
    return _checked(dataset, list(dataset.lengths()), "lengths()")


def record_modalities(dataset: Dataset) -> list[str]:
    """One modality name per record of ``dataset`` (``"image"``, ``"speech"``, ``"image+speech"``, ...)."""
    if isinstance(dataset, ConcatDataset):
        return [modality for part in dataset.datasets for modality in record_modalities(part)]
    if hasattr(dataset, "modalities"):
        return _checked(dataset, list(dataset.modalities()), "modalities()")
    return [getattr(dataset, "modality", type(dataset).__name__)] * len(dataset)


def _checked(dataset: Dataset, values: list, hook: str) -> list:
    if len(values) != len(dataset):
        raise ValueError(f"{type(dataset).__name__}.{hook} gives {len(values)} values for {len(dataset)} records")
    return values
