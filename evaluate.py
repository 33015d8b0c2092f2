"""Evaluate trained weights: ``python evaluate.py --cfg-path configs/tiny/eval_image_caption.yaml [--checkpoint PATH]``.

Prints a table per dataset and writes ``report.json`` and ``predictions.jsonl`` to ``run.output_dir``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from xllm import zoo
from xllm.common.config import save_config
from xllm.common.dist import pick_device
from xllm.common.logging import setup_logging
from xllm.common.paths import ensure_writable
from xllm.config import check_paths, load_config
from xllm.datasets.build import build_split
from xllm.datasets.loader import evaluation_loader
from xllm.eval.caption_metrics import format_table
from xllm.models.builder import build_model
from xllm.models.feature_cache import check_feature_caches
from xllm.tasks.registry import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--options", nargs="+", default=[])
    parser.add_argument("--checkpoint", help="trained weights: a run folder, a checkpoint folder or a safetensors file")
    args = parser.parse_args()
    setup_logging()
    options = args.options + ([f"model.checkpoint={args.checkpoint}"] if args.checkpoint else [])
    cfg = load_config(args.cfg_path, options)
    run = cfg.run
    check_paths(cfg)  # before any work, as training does
    ensure_writable(run.output_dir, "run.output_dir")
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    zoo.ensure(cfg)
    output_dir = Path(run.output_dir)
    save_config(cfg, output_dir)
    model = build_model(cfg.model).to(pick_device(run.device)).eval()
    task = TASKS.get(run.task)(run)
    collator = task.collator(model, training=False)
    report = {}
    with (output_dir / "predictions.jsonl").open("w") as predictions:
        parts = build_split(cfg.datasets, run.eval_split)
        check_feature_caches(model, parts.values())
        for name, dataset in parts.items():
            loader = evaluation_loader(dataset, collator, run.eval_batch_size, run.num_workers)
            entry = cfg.datasets[name]
            metrics, rows = task.evaluate(model, loader, entry.metric, entry.get("lang", "en"))
            report[name] = metrics
            for row in rows:
                predictions.write(json.dumps({"dataset": name, **row}, ensure_ascii=False) + "\n")
            print(format_table(metrics, f"{name} ({run.eval_split} split, checkpoint {cfg.model.checkpoint})"))
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report written to {output_dir / 'report.json'}")


if __name__ == "__main__":
    main()
