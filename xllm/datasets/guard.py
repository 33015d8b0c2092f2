"""Unreadable samples (a corrupt image, audio or video file) caught where they are read, in the DataLoader worker.

With the dataset's ``on_bad_sample: skip``, a training sample that cannot be read is replaced by the next readable
one, so every batch keeps its size (and every rank its step count); an evaluation sample is dropped. Either way
the problem (dataset, record, file and reason) travels with the batch (``Batch.bad``), so the runner counts,
logs and reports it and stops the run past ``run.max_bad_fraction``. With ``on_bad_sample: error`` it is an
error naming the dataset, the record and the file.
"""

from __future__ import annotations

from torch.utils.data import Dataset

REPLACEMENT_TRIES = 16  # readable neighbours tried before the run is told the data is broken there


class WrappedDataset(Dataset):
    """A dataset that changes how another's samples are read; the wrapped one's records, counts, ... stay
    reachable as its own attributes."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, attribute: str):
        if attribute == "dataset":  # not set yet (unpickling): no endless lookup
            raise AttributeError(attribute)
        return getattr(self.dataset, attribute)


class GuardedDataset(WrappedDataset):
    def __init__(self, dataset: Dataset, name: str, on_bad_sample: str, training: bool) -> None:
        super().__init__(dataset)
        self.name, self.training = name, training
        self.skip = on_bad_sample == "skip"

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except (OSError, ValueError) as error:
            record = file_record(self.dataset, index)
            problem = {"dataset": self.name, "record": record, "error": str(error)}
            if not self.skip:
                raise ValueError(f"dataset {self.name!r}, record {record}: {error} (on_bad_sample: skip replaces "
                                 "such samples in training and drops them in evaluation)") from None
        if not self.training:
            return {"id": f"{self.name}:{index}", "bad": [problem], "dropped": True}
        for step in range(1, REPLACEMENT_TRIES + 1):
            try:
                sample = self.dataset[(index + step) % len(self.dataset)]
            except (OSError, ValueError):
                continue  # reported when its own index is read
            return {**sample, "bad": [problem]}
        raise ValueError(f"dataset {self.name!r}: record {index} and the {REPLACEMENT_TRIES} after it are all "
                         f"unreadable (the first: {problem['error']})")


def note_dropped(dataset: Dataset, dropped: list[dict], total: int) -> Dataset:
    """``dataset``, one sample per kept record of an annotation file of ``total`` records, told which records were
    dropped while it was read (``{"record": index, "error"}``): they are reported (``dropped_records``), and its
    samples are named by their records' indices in the file (``file_record``)."""
    gone = {problem["record"] for problem in dropped}
    dataset.dropped_records = dropped
    dataset.file_records = [index for index in range(total) if index not in gone]
    return dataset


def file_record(dataset: Dataset, index: int) -> int:
    """The annotation file's index of the dataset's sample ``index``: they differ once records were dropped
    (the dataset's ``file_records``, ``note_dropped``), and a report must name the record a user can find."""
    positions = getattr(dataset, "file_records", None)
    return index if positions is None else positions[index]


def dropped_records(parts: dict[str, Dataset]) -> list[dict]:
    """The records each dataset's builder dropped while reading its annotations (``on_bad_sample: skip``; a
    builder lists them in the dataset's ``dropped_records``), as ``{"dataset", "record", "error", "dropped"}``."""
    return [{"dataset": name, **problem, "dropped": True} for name, part in parts.items()
            for problem in getattr(part, "dropped_records", None) or []]


def scan(parts: dict[str, Dataset], max_bad_fraction: float) -> list[dict]:
    """Reads every sample of the guarded training sets once, before any work; an error when more than
    ``max_bad_fraction`` of them are unreadable (so the run stops before its first step), else their problems.
    The records dropped while reading the annotations count as unreadable ones."""
    problems = dropped_records(parts)
    total = len(problems)
    for name, part in parts.items():
        if not isinstance(part, GuardedDataset):
            continue
        total += len(part)
        for index in range(len(part)):
            try:
                part.dataset[index]
            except (OSError, ValueError) as error:
                problems.append({"dataset": name, "record": file_record(part.dataset, index), "error": str(error)})
    if total and len(problems) > max_bad_fraction * total:
        listing = "; ".join(f"{p['dataset']} record {p['record']}: {p['error']}" for p in problems[:5])
        raise ValueError(f"{len(problems)} of {total} training samples are unreadable ({100 * len(problems) / total:.1f} "
                         f"%), more than run.max_bad_fraction={max_bad_fraction}: {listing}")
    return problems
