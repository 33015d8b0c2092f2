"""Run a config's frozen encoders once over its datasets and store their outputs: a feature cache.

    python scripts/cache_features.py --cfg-path configs/tiny/stage1_image.yaml --out outputs/cache/world_images
    python train.py --cfg-path configs/tiny/stage1_image.yaml \\
        --options datasets.world_caption.feature_cache=outputs/cache/world_images

The model (its encoders, their weights and dtype) and the datasets are the config's; ``--splits`` picks the splits
(train, val and test by default). Training and evaluation from the cache skip the encoders; a cache that does not
match the config's encoders or processors is refused, naming the difference (README_TRAIN_EVAL.md).
"""

from __future__ import annotations

import argparse

import torch

from xllm import zoo
from xllm.cache_features import SHARD_BYTES, write_feature_cache
from xllm.common.dist import pick_device
from xllm.common.dtypes import DTYPES
from xllm.common.logging import setup_logging
from xllm.common.paths import resolve_path
from xllm.config import load_config
from xllm.models.builder import build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="the run's YAML config")
    parser.add_argument("--options", nargs="+", default=[], help="overrides as dotted key=value pairs")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--out", required=True, help="the cache folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store features in this dtype (default: each "
                                                                "encoder's own)")
    parser.add_argument("--batch-size", type=int, help="media per encoder pass (default: run.eval_batch_size)")
    parser.add_argument("--shard-mb", type=int, default=SHARD_BYTES // 2 ** 20, help="a shard's size at most, in MiB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_logging()
    cfg = load_config(args.cfg_path, args.options)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    zoo.ensure(cfg)
    model = build_model(cfg.model).to(pick_device(cfg.run.device))
    out = write_feature_cache(model, cfg, resolve_path(args.out), args.splits, args.dtype, args.batch_size,
                              args.shard_mb * 2 ** 20, args.overwrite)
    print(f"feature cache written to {out}")


if __name__ == "__main__":
    main()
