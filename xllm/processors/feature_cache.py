"""The feature cache's files: frozen-encoder outputs in safetensors shards, and the manifest that names them.

``scripts/cache_features.py`` runs a config's frozen encoders once over its datasets and stores each medium's
outputs as one row: the encoder's features and mask for that medium alone, cut after its last real position
along the first axis (a speech utterance keeps its frames, an image every patch). A cache folder holds

    manifest.json                          what the features depend on, and where every sample's rows are
    <dataset>/<split>-00000.safetensors    rows ``<row>.features`` and ``<row>.mask``; the header's metadata
                                           holds each row's CRC-32, checked whenever the row is read

The manifest gives, per modality, the encoder's registered name and config, the SHA-256 of its weights and the
dtype stored; per dataset, the settings of the processors that made the encoders' inputs; per split, every
sample id in reading order with the (shard, row) of each of its media, and the records that could not be read.
A cache is written in a staging folder and renamed into place, so a folder holding a manifest is complete.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xllm.common.checkpoint import staging_folder

FORMAT, VERSION = "xllm-feature-cache", 1
MANIFEST = "manifest.json"
ABSENT = "(absent)"  # how a setting one side lacks reads in a mismatch


class FeatureCacheError(ValueError):
    """A cache that cannot be read (a missing, truncated or corrupt file) or that does not fit the config; the
    message names the file and row, or the setting and both its values."""


class MissingFromCache(KeyError):
    """A sample, or one of its media, that the cache does not hold. Not a ValueError: the data and the cache
    disagree, which ``on_bad_sample: skip`` must not pass off as one unreadable sample."""

    def __str__(self) -> str:  # KeyError's own shows the message's repr
        return str(self.args[0])


@dataclass
class EncodedMedium:
    """One medium's frozen-encoder output, as the encoder returns it for that medium alone."""

    features: torch.Tensor  # [length, ..., width]
    mask: torch.Tensor  # features.shape[:-1], True at real positions


def row_crc(features: torch.Tensor, mask: torch.Tensor) -> str:
    crc = 0
    for tensor in (features, mask):
        crc = zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return str(crc)


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from the manifest (tuples as lists), so that settings compare equal."""
    return json.loads(json.dumps(value))


def differences(cached: Any, configured: Any, key: str) -> list[str]:
    """Every setting where a cached record and the configured one differ: ``key: X in the cache, Y configured``."""
    if isinstance(cached, dict) and isinstance(configured, dict):
        found = []
        for name in sorted(set(cached) | set(configured), key=str):
            found += differences(cached.get(name, ABSENT), configured.get(name, ABSENT), f"{key}.{name}")
        return found
    return [] if cached == configured else [f"{key}: {cached!r} in the cache, {configured!r} configured"]


class ShardWriter:
    """One split's rows in numbered shards of at most ``max_bytes`` each (a row is never split)."""

    def __init__(self, root: Path, prefix: str, max_bytes: int) -> None:
        self.root, self.prefix, self.max_bytes = root, prefix, max_bytes
        self.shards: list[str] = []  # file names relative to ``root``
        self._tensors: dict[str, torch.Tensor] = {}
        self._crcs: dict[str, str] = {}
        self._bytes = 0

    def add(self, medium: EncodedMedium) -> list[int]:
        """Stores one row; returns where it is: [shard, row]."""
        size = sum(t.numel() * t.element_size() for t in (medium.features, medium.mask))
        if self._crcs and self._bytes + size > self.max_bytes:
            self._flush()
        row = str(len(self._crcs))
        # Copies: a slice of the batch's tensor would keep the whole batch alive, and safetensors refuses views.
        self._tensors[f"{row}.features"] = medium.features.clone()
        self._tensors[f"{row}.mask"] = medium.mask.clone()
        self._crcs[row] = row_crc(medium.features, medium.mask)
        self._bytes += size
        return [len(self.shards), int(row)]

    def close(self) -> list[str]:
        if self._crcs:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors, str(self.root / name), metadata=self._crcs)
        self.shards.append(name)
        self._tensors, self._crcs, self._bytes = {}, {}, 0


def write_manifest(folder: Path, manifest: dict) -> None:
    """The manifest, written last: the modality and dataset records ``manifest`` holds, stamped with the format."""
    body = {"format": FORMAT, "version": VERSION, **manifest}
    (folder / MANIFEST).write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")


class FeatureCache:
    """A finished cache folder: its manifest, and each dataset split's rows (``split``)."""

    def __init__(self, root: Path) -> None:
        path = root / MANIFEST
        if not path.is_file():
            unfinished = staging_folder(root)
            hint = f"; {unfinished} is one whose writing did not finish" if unfinished.is_dir() else ""
            raise FeatureCacheError(f"{root} is not a feature cache: it has no {MANIFEST}{hint} (write one with "
                                    "python scripts/cache_features.py)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FeatureCacheError(f"feature cache manifest {path} is not valid JSON: {error}") from None
        if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
            raise FeatureCacheError(f"{path} is not a version-{VERSION} {FORMAT} manifest")
        self.root, self.manifest = root, manifest

    @property
    def modalities(self) -> dict[str, dict]:
        """Per modality: ``encoder`` (its config block), ``weights_sha256`` and ``dtype``."""
        return self.manifest["modalities"]

    def dataset(self, name: str) -> dict:
        datasets = self.manifest["datasets"]
        if name not in datasets:
            raise FeatureCacheError(f"feature cache {self.root} holds no dataset {name!r} (it holds "
                                    f"{', '.join(sorted(datasets)) or 'none'}): it was written from another config")
        return datasets[name]

    def split(self, dataset: str, split: str) -> CachedSplit:
        splits = self.dataset(dataset)["splits"]
        if split not in splits:
            raise FeatureCacheError(f"feature cache {self.root} holds no {split!r} split of dataset {dataset!r} "
                                    f"(it holds {', '.join(sorted(splits))}); write it with --splits {split}")
        return CachedSplit(self.root, f"dataset {dataset!r}, split {split!r}", splits[split])


class CachedSplit:
    """One dataset split of a cache: a sample's media by its id. Shards are opened (memory-mapped) on first use
    by the process that reads them, a DataLoader worker say."""

    def __init__(self, root: Path, where: str, entry: dict) -> None:
        self.root, self.where = root, where
        self.shards: list[str] = entry["shards"]
        self.samples: dict[str, dict[str, list[list[int]]]] = entry["samples"]
        self.unreadable: dict[str, str] = entry["unreadable"]  # record index -> why it could not be read
        self._open: dict[int, tuple[Any, dict]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # open files belong to their process

    def media(self, sample_id: str) -> dict[str, list[EncodedMedium]]:
        """The sample's media, per modality in prompt order."""
        places = self.samples.get(sample_id)
        if places is None:
            raise MissingFromCache(f"sample {sample_id!r} is not in the feature cache {self.root} ({self.where}): "
                                   "the cache was written from other data; write it again")
        return {modality: [self.read(*place) for place in rows] for modality, rows in places.items()}

    def read(self, shard: int, row: int) -> EncodedMedium:
        path = self.root / self.shards[shard]
        handle, crcs = self._handle(shard, path)
        try:
            features, mask = handle.get_tensor(f"{row}.features"), handle.get_tensor(f"{row}.mask")
        except SafetensorError as error:
            raise FeatureCacheError(f"feature cache shard {path}: row {row} cannot be read ({error})") from None
        if crcs.get(str(row)) != row_crc(features, mask):
            raise FeatureCacheError(f"feature cache shard {path}: row {row} is corrupt (its CRC-32 differs from "
                                    "the one written); write the cache again")
        return EncodedMedium(features, mask)

    def _handle(self, shard: int, path: Path) -> tuple[Any, dict]:
        if shard not in self._open:
            if not path.is_file():
                raise FeatureCacheError(f"feature cache shard {path} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except SafetensorError as error:
                raise FeatureCacheError(f"feature cache shard {path} is truncated or corrupt ({error})") from None
            self._open[shard] = (handle, handle.metadata() or {})
        return self._open[shard]
