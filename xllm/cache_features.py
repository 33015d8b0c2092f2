"""Writes a feature cache: a model's frozen encoders run once over a config's datasets, their outputs stored.

Each split of each dataset is read as evaluation reads it (in order, through the model's own collator and a
DataLoader with ``run.num_workers`` workers), every batch's media go through their encoders in eval mode without
gradients, and each medium's outputs become one row of a shard (``xllm.processors.feature_cache``). Records that
cannot be read are skipped under the dataset's ``on_bad_sample: skip`` and listed in the manifest, so that
training from the cache meets them as unreadable again; with ``on_bad_sample: error`` they stop the writing.
A sample id met twice (COCO's captions of one image) is stored once, provided its media are the same.

The cache is written into a staging folder next to ``out`` and renamed into place once the manifest is written:
a killed run leaves no folder that looks like a finished cache.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from tqdm import tqdm

from xllm.common.checkpoint import publish, staging_folder
from xllm.common.dtypes import DTYPES, torch_dtype
from xllm.datasets.build import build_split
from xllm.datasets.feature_cache import processor_settings
from xllm.datasets.guard import GuardedDataset
from xllm.datasets.loader import evaluation_loader
from xllm.models.feature_cache import encoder_record
from xllm.models.memory import dtype_of
from xllm.processors.collator import Collator, media_list
from xllm.processors.feature_cache import MANIFEST, EncodedMedium, ShardWriter, write_manifest

log = logging.getLogger(__name__)

SHARD_BYTES = 256 * 2 ** 20  # a shard's size at most: big enough to read fast, small enough to copy and check


def input_digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.contiguous().reshape(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()


class DigestingCollator:
    """The model's collator, and per sample it keeps a digest of every medium per modality: the batch's media
    rows map back to their samples, and an id met twice must bring the same media."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, samples: list[dict]):
        kept = [s for s in samples if not s.get("dropped")]
        digests = [{m: [input_digest(t) for t in media_list(s[m])] for m in self.collator.modalities if m in s}
                   for s in kept]
        return self.collator(samples), digests


def trimmed(features: torch.Tensor, mask: torch.Tensor) -> EncodedMedium:
    """One medium's outputs cut after its last real position along the first axis (a batch pads speech)."""
    real = mask.reshape(mask.shape[0], -1).any(dim=1).nonzero()
    length = int(real.max()) + 1 if len(real) else 0
    return EncodedMedium(features[:length], mask[:length])


def read_once(part: Dataset, name: str, on_bad_sample: str) -> Dataset:
    """A built split read as evaluation reads it: an unreadable record is dropped (and reported), never replaced
    by its neighbour, whose features would be stored under the wrong id."""
    return GuardedDataset(part.dataset, name, on_bad_sample, training=False) if isinstance(part, GuardedDataset) \
        else part


def cache_split(model: nn.Module, dataset: Dataset, writer: ShardWriter, dtypes: dict[str, torch.dtype],
                batch_size: int, num_workers: int, what: str) -> dict:
    """One split's manifest entry: its samples' (shard, row) per medium, its shards and its unreadable records."""
    # Each worker would read a whole stream again: a stream is read in the main process.
    workers = 0 if isinstance(dataset, IterableDataset) else num_workers
    loader = evaluation_loader(dataset, DigestingCollator(model.collator(with_answers=False)), batch_size, workers)
    samples: dict[str, dict[str, list[list[int]]]] = {}
    inputs: dict[str, dict[str, list[str]]] = {}
    unreadable: dict[str, str] = {}
    for batch, digests in tqdm(loader, desc=what, total=None if isinstance(dataset, IterableDataset) else len(loader)):
        for problem in batch.bad:
            unreadable[str(problem["record"])] = problem["error"]
        if not len(batch):
            continue
        batch = batch.to(model.device)
        with torch.no_grad():
            outputs = {m: model.modality(m).encoded(media) for m, media in batch.media.items()}
        cursor: Counter = Counter()
        for sample_id, media in zip(batch.ids, digests):
            if sample_id in samples:
                if inputs[sample_id] != media:
                    raise ValueError(f"{what}: sample id {sample_id!r} comes twice with different media; a feature "
                                     "cache finds a sample's media by its id, so ids must name their media")
            else:
                samples[sample_id] = {}
                for modality, items in media.items():
                    features, mask = outputs[modality]
                    rows = range(cursor[modality], cursor[modality] + len(items))
                    samples[sample_id][modality] = [
                        writer.add(trimmed(features[i].to("cpu", dtypes[modality]), mask[i].to("cpu", torch.bool)))
                        for i in rows]
                inputs[sample_id] = media
            cursor.update({modality: len(items) for modality, items in media.items()})
    return {"shards": writer.close(), "samples": samples, "unreadable": unreadable}


def write_feature_cache(model: nn.Module, cfg: DictConfig, out: Path, splits: list[str], dtype: str | None = None,
                        batch_size: int | None = None, shard_bytes: int = SHARD_BYTES,
                        overwrite: bool = False) -> Path:
    """Caches ``model``'s encoder outputs over ``splits`` of every dataset of ``cfg`` (a loaded run config) in
    ``out``; ``dtype`` stores them in another dtype than each encoder's own. Returns ``out``."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise FileExistsError(f"{out} is not a feature cache (it has no {MANIFEST}): it is not replaced")
    staging = staging_folder(out)
    shutil.rmtree(staging, ignore_errors=True)  # what a killed writer left
    staging.mkdir(parents=True)
    model.eval()
    dtypes = {m: torch_dtype(dtype) if dtype else dtype_of(encoder) or torch.float32
              for m, encoder in model.encoders.items()}
    names = {value: name for name, value in DTYPES.items()}
    manifest = {"modalities": {m: {**encoder_record(model, m), "dtype": names[dtypes[m]]} for m in model.encoders},
                "datasets": {}}
    datasets = OmegaConf.create(OmegaConf.to_container(cfg.datasets))
    for entry in datasets.values():
        entry.feature_cache = None  # a training config may name the cache being written: read the media themselves
    for split in splits:
        for name, part in build_split(datasets, split).items():
            entry = datasets[name]
            dataset = read_once(part, name, entry.get("on_bad_sample", "error"))
            raw = dataset.dataset if isinstance(dataset, GuardedDataset) else dataset
            record = manifest["datasets"].setdefault(name, {"builder": entry.builder, "splits": {},
                                                            "processors": processor_settings(raw, name)})
            writer = ShardWriter(staging, f"{name}/{split}", shard_bytes)
            record["splits"][split] = cache_split(model, dataset, writer, dtypes, batch_size or cfg.run.eval_batch_size,
                                                  cfg.run.num_workers, f"{name} {split}")
            found = record["splits"][split]
            log.info("%s %s: %d samples in %d shards, %d unreadable", name, split, len(found["samples"]),
                     len(found["shards"]), len(found["unreadable"]))
    write_manifest(staging, manifest)
    return publish(out, keep_last=0)
