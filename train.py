"""Train one stage: ``python train.py --cfg-path configs/tiny/stage2_image.yaml [--options k=v ...] [--resume]``."""

from __future__ import annotations

import argparse
import random

import torch

from xllm.common import dist
from xllm.common.config import load_config, save_config
from xllm.common.logging import setup_logging
from xllm.common.registry import registry
from xllm.datasets.build import build_split
from xllm.models.builder import build_model
from xllm.datasets.mixture import concat, training_set
from xllm.runners.runner import Runner
from xllm import zoo


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
    if args.resume:
        cfg.run.resume = args.resume
    dist.init_distributed()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed + dist.rank())
    torch.manual_seed(cfg.run.seed + dist.rank())
    zoo.ensure(cfg)
    if dist.is_main():
        print(f"config saved to {save_config(cfg, cfg.run.output_dir)}")
    model = build_model(cfg.model)
    task = registry.get("task", cfg.run.task)(cfg.run)
    train_set = training_set(build_split(cfg.datasets, "train"), cfg.datasets, cfg.run.seed)
    val_sets = build_split(cfg.datasets, "val")
    runner = Runner(cfg, model, task, train_set, concat(list(val_sets.values())))
    if cfg.run.resume:
        runner.resume(cfg.run.resume)
    checkpoint = runner.train()
    if dist.is_main():
        print(f"trained weights: {checkpoint}")


if __name__ == "__main__":
    main()
