"""Padding in training batches with and without length grouping (``run.group_by_length``), from the records' lengths.

    PYTHONPATH=. python benchmarks/padding.py [--epochs 3] [--speech-cfg tiny/stage2_speech.yaml] \\
        [--mixture-cfg tiny/stage3.yaml] [--speech-options k=v ...] [--mixture-options k=v ...]

Each config's training set is built as ``train.py`` builds it (the ratio mixture of stage 3 included; the synthetic
world is written on first use), and its batches are the ones ``training_loader`` deals with the config's batch
size, in one process: shuffled (``EpochSampler``) or grouped (``LengthGroupedSampler``), incomplete last batches
dropped, over ``--epochs`` epochs. No sample is read: lengths come from the datasets' ``lengths()``
(``xllm.datasets.lengths``: seconds of audio for speech, from the manifest or the file's header; steps for signals;
text units otherwise), modalities from their ``modalities()``.

Within a batch, the records of one modality are padded to the longest of them along what their length counts (the
audio of speech, the text of an image's sample), so a modality's padding is the sum over batches of (its members x
their longest - their lengths) over the sum of (its members x their longest). The table gives it per modality of
each config without and with grouping, and the share of batches that mix modalities (grouping keeps modalities
apart, but for the epoch's remainder). The text of different modalities in one batch is padded together as well;
that is not counted here.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from torch.utils.data import Dataset

from xllm.config import load_config
from xllm.datasets.build import build_split
from xllm.datasets.lengths import record_lengths, record_modalities
from xllm.datasets.loader import training_loader
from xllm.datasets.mixture import training_set


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, grouped: bool, epochs: int) -> list[list[int]]:
    """The index batches the training loader deals over ``epochs`` epochs."""
    loader = training_loader(dataset, list, batch_size, seed, group_by_length=grouped)  # no sample is collated
    batches = []
    for epoch in range(epochs):
        loader.sampler.set_position(epoch, 0)
        batches += list(loader.batch_sampler)
    return batches


def padding(batches: list[list[int]], lengths: list[float], modalities: list[str]) -> tuple[dict[str, float], float]:
    """Per modality, the padded share of its padded media; and the share of batches that mix modalities."""
    padded: dict[str, float] = defaultdict(float)
    real: dict[str, float] = defaultdict(float)
    mixed = 0
    for batch in batches:
        members: dict[str, list[float]] = defaultdict(list)
        for index in batch:
            members[modalities[index]].append(lengths[index])
        mixed += len(members) > 1
        for modality, values in members.items():
            padded[modality] += len(values) * max(values)
            real[modality] += sum(values)
    return {m: 1 - real[m] / padded[m] if padded[m] else 0.0 for m in sorted(padded)}, mixed / len(batches)


def measure(cfg_path: str, options: list[str],
            epochs: int) -> tuple[list[tuple[str, int, float, float]], tuple[float, float], int]:
    """One row per modality (modality, samples, padding without and with grouping), the shares of mixed batches
    (without, with) and the batch size."""
    cfg = load_config(cfg_path, options)
    run = cfg.run
    dataset = training_set(build_split(cfg.datasets, "train"), cfg.datasets, run.seed)
    lengths, modalities = record_lengths(dataset), record_modalities(dataset)
    results = [padding(epoch_batches(dataset, run.batch_size, run.seed, grouped, epochs), lengths, modalities)
               for grouped in (False, True)]
    counts = {m: modalities.count(m) for m in set(modalities)}
    rows = [(m, counts[m], results[0][0][m], results[1][0][m]) for m in results[0][0]]
    return rows, (results[0][1], results[1][1]), run.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speech-cfg", default="tiny/stage2_speech.yaml")
    parser.add_argument("--speech-options", nargs="+", default=[], help="overrides of the speech config, key=value")
    parser.add_argument("--mixture-cfg", default="tiny/stage3.yaml")
    parser.add_argument("--mixture-options", nargs="+", default=[], help="overrides of the mixture config, key=value")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of batches per setting (orders differ by epoch)")
    args = parser.parse_args()
    configs = {args.speech_cfg: args.speech_options, args.mixture_cfg: args.mixture_options}
    results = {path: measure(path, options, args.epochs) for path, options in configs.items()}

    print(f"\npadding of training batches, without and with run.group_by_length, {args.epochs} epoch(s), one process")
    print(f"{'config':<28}{'batch':>6}{'modality':>16}{'samples':>9}{'padding without':>17}{'with':>8}")
    for path, (rows, mixed, batch) in results.items():
        for modality, samples, without, grouped in rows:
            print(f"{path:<28}{batch:>6}{modality:>16}{samples:>9}{100 * without:>16.1f}%{100 * grouped:>7.1f}%")
        if len(rows) > 1:
            print(f"{path:<28}{'':>6}{'mixed batches':>16}{'':>9}{100 * mixed[0]:>16.1f}%{100 * mixed[1]:>7.1f}%")
    print("padding: in each modality's batches, the share of its padded length that is padding (in the datasets' "
          "units); mixed batches: the share of batches holding more than one modality")


if __name__ == "__main__":
    main()
