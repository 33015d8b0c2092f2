"""Pictures of runs and evaluations: ``python -m xllm.plot FOLDER [--out PNG]``.

- A run folder (``log.jsonl``): training curves, i.e. the loss (and each task's loss in a mixture), the learning
  rate, and the validation loss, by optimizer step.
- An evaluation folder (``predictions.jsonl`` of ``evaluate.py`` on the synthetic world's captions): a confusion
  table per attribute (kind, colour, size, position), reference shape against the shape named in the same place
  of the generated caption (``missing`` when the caption names fewer shapes).
- A LLaVA-Bench review file (``python -m xllm.eval.llava_bench judge``'s output, or a published one): the score
  relative to GPT-4 per category, beside GPT-4 (100) and X-LLM's published figures.

Needs matplotlib (``pip install 'xllm[plot]'``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from xllm.eval.llava_bench import summarize
from xllm.eval.llava_bench_files import read_records
from xllm.world.scenes import ATTRIBUTES, parse_caption

MISSING = "missing"
XLLM_PUBLISHED = {"conv": 85.4, "detail": 83.5, "complex": 84.6, "all": 84.5}  # the paper's LLaVA-Bench (COCO) table


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'xllm[plot]'") from None
    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt

    return plt


def curves(run_dir: Path, out: Path) -> Path:
    """Loss per task, learning rate and validation loss against the step."""
    rows = read_jsonl(run_dir / "log.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not train:
        raise ValueError(f"{run_dir / 'log.jsonl'} holds no training rows")
    plt = pyplot()
    figure, (losses, rates) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss/")})
    for key in keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        losses.plot(*zip(*points), label=f"train {key}", linewidth=1.5 if key == "loss" else 1.0)
    if val:
        losses.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    losses.set(xlabel="step", ylabel="loss", yscale="log", title=run_dir.name)
    losses.legend()
    rates.plot([r["step"] for r in train], [r["lr"] for r in train])
    rates.set(xlabel="step", ylabel="learning rate", title="schedule")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def confusions(predictions: list[dict], lang: str = "en") -> dict[str, Counter]:
    """Per attribute, counts of (reference value, predicted value) over every reference shape."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in predictions:
        reference = parse_caption(row["reference"], row.get("lang") or lang)
        named = parse_caption(row["prediction"] or "", row.get("lang") or lang)
        for index, shape in enumerate(reference):
            for attribute in ATTRIBUTES:
                guess = getattr(named[index], attribute) if index < len(named) else MISSING
                counts[attribute][(getattr(shape, attribute), guess)] += 1
    return counts


def confusion_tables(eval_dir: Path, out: Path) -> Path:
    counts = confusions(read_jsonl(eval_dir / "predictions.jsonl"))
    if not counts:
        raise ValueError(f"{eval_dir / 'predictions.jsonl'}: no reference follows the world's caption grammar")
    plt = pyplot()
    figure, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(5 * len(ATTRIBUTES), 4.8))
    for axis, attribute in zip(axes, ATTRIBUTES):
        table = counts[attribute]
        truths = sorted({t for t, _ in table})
        guesses = truths + sorted({g for _, g in table} - set(truths))
        cells = [[table[(t, g)] for g in guesses] for t in truths]
        axis.imshow(cells, cmap="Blues")
        darkest = max(max(row) for row in cells)
        for i, row in enumerate(cells):
            for j, value in enumerate(row):
                if value:
                    axis.text(j, i, str(value), ha="center", va="center", fontsize=7,
                              color="white" if value > darkest / 2 else "black")
        correct = sum(table[(t, t)] for t in truths) / max(sum(table.values()), 1)
        axis.set(title=f"{attribute}: {100 * correct:.1f} % right", xlabel="generated", ylabel="reference",
                 xticks=range(len(guesses)), yticks=range(len(truths)))
        axis.set_xticklabels(guesses, rotation=60, ha="right", fontsize=7)
        axis.set_yticklabels(truths, fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def llava_bench_bars(reviews: Path, out: Path, exclude_failures: bool = False) -> Path:
    """Relative scores per category (model / GPT-4, %), beside GPT-4 and X-LLM's published figures."""
    summary = summarize(read_records(reviews, "reviews"), exclude_failures, source=str(reviews))
    names = list(summary.groups)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.27
    series = [("GPT-4 (reference)", [100.0] * len(names)),
              (f"{reviews.name}, summarised here", [summary.groups[n].relative or 0 for n in names]),
              ("X-LLM (published)", [XLLM_PUBLISHED.get(n, 0.0) for n in names])]
    for offset, (label, values) in enumerate(series):
        bars = axis.bar([i + (offset - 1) * width for i in range(len(names))], values, width, label=label)
        axis.bar_label(bars, fmt="%.1f", fontsize=7)
    failures = f", {len(summary.failures)} failures {'counted' if summary.failures_counted else 'left out'}"
    axis.set(xticks=range(len(names)), ylabel="score relative to GPT-4 (%)", ylim=(0, 135),
             title=f"LLaVA-Bench (COCO): {reviews.name}{failures}")
    axis.set_xticklabels(names)
    axis.legend(fontsize=8, loc="upper center", ncol=3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a run folder (log.jsonl), an evaluation folder "
                                                  "(predictions.jsonl) or a LLaVA-Bench review file")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: beside the input)")
    parser.add_argument("--exclude-failures", action="store_true", help="LLaVA-Bench: leave unparsed reviews out")
    args = parser.parse_args()
    if args.folder.is_file():
        print(llava_bench_bars(args.folder, args.out or args.folder.with_suffix(".png"), args.exclude_failures))
    elif (args.folder / "log.jsonl").is_file():
        print(curves(args.folder, args.out or args.folder / "curves.png"))
    elif (args.folder / "predictions.jsonl").is_file():
        print(confusion_tables(args.folder, args.out or args.folder / "confusion.png"))
    else:
        raise SystemExit(f"{args.folder} holds neither log.jsonl (a run) nor predictions.jsonl (an evaluation)")


if __name__ == "__main__":
    main()
