"""Export a trained run as a shared model folder: ``python -m xllm.export --run outputs/tiny/stage2_image --out DIR``
(``--checkpoint STEP``, ``--include-frozen``, ``--merge-lora``, ``--eval FOLDER``).

The run's model is rebuilt as training left it (its ``config.yaml``, what it started from, its latest checkpoint or
``--checkpoint``), its LoRA adapters merged into the LLM if asked, and written by ``XLLM.save_pretrained`` with a
model card gathered from the run folder: every stage that led to it (the runs its ``model.checkpoint`` names, then
its own: task, what trained, datasets, steps and losses), the datasets, and the figures of the evaluation reports
found: ``report.json`` in the run folder, in the evaluation runs beside it whose config loads it (``evaluate.py``
writes them), and in the folders ``--eval`` names.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xllm.common.checkpoint import WEIGHTS, latest_checkpoint
from xllm.common.config import RUN_CONFIG, as_list
from xllm.common.logging import setup_logging
from xllm.common.paths import resolve_path
from xllm.models.builder import build_run
from xllm.models.lora import merge_lora

log = logging.getLogger(__name__)

REPORT = "report.json"  # evaluate.py's figures, by dataset


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the training run's output folder")
    parser.add_argument("--checkpoint", help="a step folder or safetensors file of the run (default: its latest)")
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--include-frozen", action="store_true",
                        help="store every weight, so the folder loads without the frozen parts' sources")
    parser.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the LLM's weights")
    parser.add_argument("--eval", action="append", default=[], metavar="FOLDER",
                        help="an evaluation output folder whose report.json the card shows (repeatable)")
    parser.add_argument("--title", help="the model card's title (default: the run's name)")
    args = parser.parse_args(argv)
    setup_logging()
    run = resolve_path(args.run)
    checkpoint = resolve_path(args.checkpoint) if args.checkpoint else None
    model = build_run(run, checkpoint)
    if args.merge_lora and not merge_lora(model):
        log.warning("--merge-lora: the model has no LoRA adapters (model.llm.lora) to merge")
    card = run_card(run, checkpoint, [resolve_path(e) for e in args.eval])
    card["title"] = args.title or run.name
    folder = model.save_pretrained(resolve_path(args.out), include_frozen=args.include_frozen, card=card)
    print(f"model folder written: {folder}")
    return folder


def run_card(run: Path, checkpoint: Path | None = None, evals: Iterable[Path] = ()) -> dict[str, Any]:
    """The card of a run folder's model: its stages, their datasets, and the evaluation figures found."""
    stages, datasets = [], {}
    for folder, step in stage_runs(run, checkpoint):
        cfg = OmegaConf.load(folder / RUN_CONFIG)
        stages.append(stage_summary(folder, cfg, step))
        datasets.update({name: dataset_summary(entry) for name, entry in cfg.get("datasets", {}).items()})
    figures = {}
    for folder in [run, *evaluation_runs(run), *evals]:
        report = folder / REPORT
        if report.is_file():
            config = folder / RUN_CONFIG
            split = OmegaConf.load(config).get("run", {}).get("eval_split") if config.is_file() else None
            figures[folder.name + (f" ({split} split)" if split else "")] = json.loads(report.read_text("utf-8"))
        elif folder != run:
            raise FileNotFoundError(f"--eval {folder}: it holds no {REPORT} (evaluate.py writes one)")
    return {"stages": stages, "datasets": datasets, "figures": figures}


def stage_runs(run: Path, checkpoint: Path | None = None,
               seen: set[Path] | None = None) -> list[tuple[Path, Path | None]]:
    """(run folder, checkpoint or None for its latest) of every run that led to ``run``, oldest first: the runs its
    ``model.checkpoint`` names (a stage-3 run names each stage-2 run it builds on), then ``run`` itself."""
    seen = set() if seen is None else seen
    seen.add(run.resolve())
    earlier = []
    model = OmegaConf.load(run / RUN_CONFIG).model
    for spec in as_list(model.checkpoint) if model.checkpoint else []:
        found = run_of(resolve_path(spec))
        if found is not None and found[0].resolve() not in seen:
            earlier += stage_runs(*found, seen)
    return [*earlier, (run, checkpoint)]


def run_of(path: Path) -> tuple[Path, Path | None] | None:
    """The run folder (and step folder, if one is named) of a ``model.checkpoint`` entry; None for weights that no
    run folder holds."""
    if path.is_file():
        path = path.parent
    if (path / RUN_CONFIG).is_file():
        return path, None
    if path.parent.name == "checkpoints" and (path.parent.parent / RUN_CONFIG).is_file():
        return path.parent.parent, path
    return None


def stage_summary(run: Path, cfg: DictConfig, checkpoint: Path | None) -> dict[str, Any]:
    step = checkpoint if checkpoint is not None else latest_checkpoint(run)
    if step is not None and step.is_file():
        step = step.parent if step.name == WEIGHTS else None
    manifest = step / "manifest.json" if step is not None else None
    written = json.loads(manifest.read_text("utf-8")) if manifest is not None and manifest.is_file() else {}
    summary = {"stage": run.name, "task": cfg.run.get("task"), "trains": ", ".join(cfg.model.trainable),
               "datasets": ", ".join(cfg.get("datasets", {})), "steps": written.get("step")}
    train_loss = last_train_loss(run / "log.jsonl", written.get("step"))
    if train_loss is not None:
        summary["train loss"] = train_loss
    if written.get("val_loss") is not None:
        summary["val loss"] = written["val_loss"]
    return summary


def last_train_loss(log_file: Path, step: int | None) -> float | None:
    """The last training loss ``log.jsonl`` records at or before ``step``."""
    loss = None
    for line in log_file.read_text("utf-8").splitlines() if log_file.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves half a line
            continue
        if row.get("split") == "train" and row.get("loss") is not None and (step is None or row["step"] <= step):
            loss = row["loss"]
    return loss


def dataset_summary(entry: DictConfig) -> str:
    parts = [f"builder {entry.builder}"]
    if entry.get("world"):
        parts.append("synthetic world " + ", ".join(f"{k}={v}" for k, v in entry.world.items()))
    if entry.get("ratio") not in (None, 1, 1.0):
        parts.append(f"ratio {entry.ratio}")
    return "; ".join(parts)


def evaluation_runs(run: Path) -> list[Path]:
    """Output folders beside ``run`` whose config's last ``model.checkpoint`` is ``run`` or one of its checkpoints:
    the evaluations of its model (``configs/tiny/eval_*.yaml`` write to ``outputs/tiny/eval_*``)."""
    found = []
    for folder in sorted(p for p in run.parent.iterdir() if p.is_dir() and p != run):
        config = folder / RUN_CONFIG
        if not config.is_file() or not (folder / REPORT).is_file():
            continue
        checkpoint = OmegaConf.load(config).get("model", {}).get("checkpoint")
        if not checkpoint:
            continue
        last = resolve_path(as_list(checkpoint)[-1]).resolve()
        if last == run.resolve() or run.resolve() in last.parents:
            found.append(folder)
    return found


if __name__ == "__main__":
    main()
