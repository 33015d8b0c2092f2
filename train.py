"""Train one stage: ``python train.py --cfg-path configs/tiny/stage2_image.yaml [--options k=v ...] [--resume]``."""

from __future__ import annotations

import argparse
import random

import torch
from omegaconf import OmegaConf

from xllm import zoo
from xllm.common import dist
from xllm.common.config import save_config
from xllm.common.paths import ensure_writable
from xllm.common.logging import setup_logging
from xllm.config import check_paths, load_config, per_process_batch_size
from xllm.datasets.build import build_split
from xllm.datasets.guard import dropped_records, scan
from xllm.datasets.loader import evaluation_loader, training_loader
from xllm.datasets.mixture import concat, training_set
from xllm.models.builder import build_model
from xllm.models.feature_cache import check_feature_caches
from xllm.runners.runner import Runner
from xllm.tasks.registry import TASKS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cfg-path", required=True, help="the run's YAML config")
    parser.add_argument("--options", nargs="+", default=[], help="overrides as dotted key=value pairs")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="a checkpoint folder, or nothing for the run's latest checkpoint")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_logging()
    cfg = load_config(args.cfg_path, args.options)
    run = cfg.run
    if args.resume:
        run.resume = args.resume
    # Before any work: a missing input or a read-only output folder fails here, naming its config key.
    check_paths(cfg)
    ensure_writable(run.output_dir, "run.output_dir")
    dist.init_distributed()
    dist.check_same_everywhere(OmegaConf.to_yaml(cfg), "config")
    run.batch_size = per_process_batch_size(run, dist.world_size())
    if run.threads:
        torch.set_num_threads(run.threads)
    random.seed(run.seed + dist.rank())
    torch.manual_seed(run.seed + dist.rank())
    with dist.main_first():  # rank 0 builds the zoo and writes the synthetic world; the others then read them
        zoo.ensure(cfg)
        train_parts, val_parts = build_split(cfg.datasets, "train"), build_split(cfg.datasets, "val")
    if dist.is_main():
        print(f"config saved to {save_config(cfg, run.output_dir)}")
    model = build_model(cfg.model)
    check_feature_caches(model, [*train_parts.values(), *val_parts.values()])
    task = TASKS.get(run.task)(run)
    if run.max_bad_fraction is not None:  # every sample read once: too much bad data stops the run here
        scan(train_parts, run.max_bad_fraction)
    train_set = training_set(train_parts, cfg.datasets, run.seed)
    train_loader = training_loader(train_set, task.collator(model, training=True), run.batch_size, run.seed,
                                   run.num_workers, run.group_by_length)
    val_set = concat(list(val_parts.values()))
    val_loader = evaluation_loader(val_set, task.collator(model, training=True), run.eval_batch_size,
                                   run.num_workers)
    runner = Runner(run, model, task, train_loader, val_loader, dropped_records(train_parts))
    if run.resume:
        runner.resume(run.resume)
    checkpoint = runner.train()
    if dist.is_main():
        print(f"trained weights: {checkpoint}")
    dist.shutdown()


if __name__ == "__main__":
    main()
