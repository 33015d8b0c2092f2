"""A dataset read from a feature cache (``datasets.<name>.feature_cache``): its samples carry the frozen encoders'
outputs in place of their media.

The builder's dataset is built as usual; then each of its media processors (the image, video, audio and signal
processors it holds) is replaced by ``Unread``, which returns ``NOT_READ`` without opening a file, and every
sample's media fields are filled with the cached rows of its id (``EncodedMedium``; the collator batches them
and the model's encoders do not run). Before that, the processors' settings are compared with those the cache
was written with: a cache made from other pixels or other mel features is refused, naming the setting. So is a
processor that augments at random (it declares such settings with ``random_transforms()``; none of xllm's own
does): a cache would freeze one draw of it.

A record that could not be read when the cache was written is unreadable again, and a shard that is missing,
truncated or corrupt is a ``FeatureCacheError``: both reach ``xllm.datasets.guard`` as any unreadable sample.
A sample id, or a medium, the cache lacks is ``MissingFromCache``, which no guard skips.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, IterableDataset

from xllm.common.paths import resolve_path
from xllm.datasets.guard import WrappedDataset
from xllm.processors.feature_cache import (CachedSplit, FeatureCache, FeatureCacheError, MissingFromCache,
                                           differences, jsonable)
from xllm.processors.registry import PROCESSORS


class _NotRead:
    def __repr__(self) -> str:
        return "<not read: the media come from the feature cache>"


NOT_READ = _NotRead()


class Unread:
    """A media processor's stand-in: reads nothing. Its settings stay reachable (a dataset may draw a scene at
    its processor's image size)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, *args, **kwargs) -> _NotRead:
        return NOT_READ

    def __getattr__(self, name: str) -> Any:
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)


def media_processors(dataset: Dataset) -> dict[str, Any]:
    """The dataset's media processors by attribute name: registered processors that make an encoder's inputs
    (they report their ``settings()``)."""
    kinds = tuple(PROCESSORS.get(name) for name in PROCESSORS.names())
    return {attribute: value for attribute, value in vars(dataset).items()
            if isinstance(value, kinds) and callable(getattr(value, "settings", None))}


def processor_kind(processor: Any) -> str:
    """The registered name of the processor's class, or else of the registered class it extends."""
    names = PROCESSORS.names()
    exact = [name for name in names if type(processor) is PROCESSORS.get(name)]
    return (exact or [name for name in names if isinstance(processor, PROCESSORS.get(name))])[0]


def processor_settings(dataset: Dataset, name: str) -> dict[str, dict]:
    """Per kind of processor (``image``, ``audio``, ...), the settings the dataset's media depend on; a processor
    that augments at random is an error naming the settings, since a cache would freeze one draw of it."""
    settings = {}
    for processor in media_processors(dataset).values():
        kind = processor_kind(processor)
        random = getattr(processor, "random_transforms", dict)()
        if random:
            shown = ", ".join(f"{key}={value!r}" for key, value in random.items())
            raise FeatureCacheError(f"datasets.{name}: its {kind} processor augments at random ({shown}); a feature "
                                    "cache would freeze one draw of it: turn the augmentation off or train without "
                                    "feature_cache")
        if kind in settings:
            raise FeatureCacheError(f"datasets.{name}: its dataset holds two {kind} processors; a feature cache "
                                    "records one per kind")
        settings[kind] = jsonable(processor.settings())
    return settings


def holds_unread(value: Any) -> bool:
    return value is NOT_READ or isinstance(value, (list, tuple)) and any(item is NOT_READ for item in value)


class CachedMedia:
    """Fills a sample's media fields from a cache split."""

    def __init__(self, cached: CachedSplit, cache: FeatureCache) -> None:
        self.cached, self.cache = cached, cache

    def fill(self, sample: dict) -> dict:
        sample = {**sample, **self.cached.media(str(sample.get("id")))}
        left = sorted(key for key, value in sample.items() if holds_unread(value))
        if left:
            raise MissingFromCache(f"sample {sample.get('id')!r}: its {', '.join(left)} media are not in the "
                                   f"feature cache {self.cache.root} (it holds {', '.join(self.cache.modalities)}): "
                                   "write the cache with a model that has every modality the data holds")
        return sample


class CachedDataset(WrappedDataset):
    def __init__(self, dataset: Dataset, media: CachedMedia) -> None:
        super().__init__(dataset)
        self.media = media
        self.feature_cache = media.cache

    def __getitem__(self, index: int) -> dict:
        error = self.media.cached.unreadable.get(str(index))
        if error is not None:
            raise FeatureCacheError(f"{error} (unreadable when the feature cache was written)")
        return self.media.fill(self.dataset[index])


class CachedStream(IterableDataset):
    """A stream (webdataset shards) whose samples, or batches of samples, are filled as they pass."""

    def __init__(self, stream: IterableDataset, media: CachedMedia) -> None:
        self.stream, self.media = stream, media
        self.feature_cache = media.cache

    @property
    def batch_size(self) -> int | None:  # the training loader sets the stream's batch size through here
        return self.stream.batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self.stream.batch_size = value

    def set_position(self, epoch: int, start: int) -> None:
        self.stream.set_position(epoch, start)

    def __iter__(self):
        for item in self.stream:
            yield [self.media.fill(s) for s in item] if isinstance(item, list) else self.media.fill(item)


def with_feature_cache(dataset: Dataset, name: str, folder: str, split: str) -> Dataset:
    """``dataset`` reading its media from the cache in ``folder``, once its processors' settings match the
    cache's; a mismatch is an error naming every setting with both values."""
    cache = FeatureCache(resolve_path(folder))
    cached = cache.split(name, split)
    problems = differences(cache.dataset(name)["processors"], processor_settings(dataset, name),
                           f"datasets.{name} processor")
    if problems:
        raise FeatureCacheError(f"feature cache {cache.root} was written from other inputs than datasets.{name} "
                                "makes: " + "; ".join(problems) + " (write the cache again with this config)")
    for attribute, processor in media_processors(dataset).items():
        setattr(dataset, attribute, Unread(processor))
    media = CachedMedia(cached, cache)
    return CachedStream(dataset, media) if isinstance(dataset, IterableDataset) else CachedDataset(dataset, media)
