"""Training with and without the frozen-encoder feature cache: a stage-1 image epoch and stage-2 image steps.

    PYTHONPATH=. python benchmarks/feature_cache.py --size small [--samples 64] [--batch 8] [--steps 2] \\
        [--rounds 3] [--workers 0] [--threads 1]

The models are ``blip2_pair.py``'s at ``--size`` ("small": 224 px, ViT 8 x 384, Q-Former 6 x 384, Llama 8 x 576 with
a 49,152-word vocabulary): stage 2 is its xllm model (Q-Former and projection train), stage 1 the same ViT under a
Q-Former with its text branch (``qformer_text``, BLIP-2's contrastive, matching and generation losses) and no LLM.
The LLM's folder holds the tiny tier's tokenizer (trained here, ``xllm.zoo.tiny_llm``), which spells the world's
captions; the Q-Former's text branch the tiny tier's word-level one (``xllm.zoo.text_tokenizer``).

The data are ``--samples`` world images (``xllm.world``) drawn at the model's image size into a temporary folder,
read by the ``coco_caption`` builder. The stage-2 model writes the cache once over them (``write_feature_cache``,
as ``scripts/cache_features.py`` does; timed), and the same datasets are then built twice: reading the images, and
from the cache (``datasets.world_caption.feature_cache``), whose samples carry the encoder's outputs so that the
ViT does not run. Both stages share the frozen ViT's weights, so one cache serves both, as it would in a run.

Timed, alternating rounds, each setting after one untimed step: a stage-1 epoch (the training loader with
``--workers`` workers, through the task's collator, then forward, backward and AdamW per batch) and ``--steps``
stage-2 steps on one collated batch. The table gives samples/s (median over rounds and its range) and cached / raw
(median and range over the rounds' pairs).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from blip2_pair import SIZES, Size, hf_blip2, save_folders, xllm_model
from blip2_step import Trainer
from rounds import alternating, speed_ratios, spread, timed
from xllm.cache_features import write_feature_cache
from xllm.common.config import typed
from xllm.config import RunConfig
from xllm.datasets.build import build_split
from xllm.datasets.config import resolve_datasets
from xllm.datasets.loader import training_loader
from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.models.feature_cache import check_feature_caches
from xllm.models.xllm import XLLM
from xllm.tasks.registry import TASKS
from xllm.zoo.text_tokenizer import TinyTextTokenizerRecipe, build_text_tokenizer
from xllm.zoo.tiny_llm import TinyLLMRecipe, train_tokenizer

NAME = "world_caption"
# Enough text to cover the world's words: the tokenizers' vocabularies, not their quality, matter here.
LLM_TOKENIZER_DOCUMENTS, TEXT_TOKENIZER_DOCUMENTS = 2000, 300


def stage1_model(stage2: XLLM, text_tokenizer: Path) -> XLLM:
    """Stage 1's model: stage 2's model config and ViT weights, the Q-Former with its text branch, no LLM."""
    cfg = OmegaConf.to_container(stage2.config)
    cfg["modalities"]["image"]["interface"].update(name="qformer_text", tokenizer=str(text_tokenizer))
    cfg.update(llm={"backend": "none", "path": ""}, pretrained=[], trainable=["interfaces.image"])
    torch.manual_seed(0)
    model = build_model(resolve_model(OmegaConf.create(cfg)))
    model.encoders["image"].load_state_dict(stage2.encoders["image"].state_dict())
    return model


def world_run(size: Size, samples: int, batch: int, workers: int, storage: Path) -> DictConfig:
    """A run config with the world-image dataset (what ``write_feature_cache`` reads: datasets and run)."""
    world = {"seed": 0, "num_train": samples, "num_val": 1, "num_test": 1, "image_size": size.image_size}
    datasets = {NAME: {"builder": "coco_caption", "storage": str(storage), "world": world,
                       "image_size": size.image_size}}
    run = typed(RunConfig, {"batch_size": batch, "eval_batch_size": batch, "num_workers": workers}, "run")
    return OmegaConf.create({"datasets": resolve_datasets(datasets), "run": run})


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--samples", type=int, default=64, help="world images: a stage-1 epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed stage-2 steps per setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=RunConfig.num_workers, help="the stage-1 loader's workers "
                                                                                   "(run.num_workers' default)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_text_tokenizer(root / "text_tokenizer", TinyTextTokenizerRecipe(documents=TEXT_TOKENIZER_DOCUMENTS))
        tokenizer = train_tokenizer(TinyLLMRecipe(tokenizer_documents=LLM_TOKENIZER_DOCUMENTS))
        stage2 = xllm_model(size, *save_folders(hf_blip2(size), size, root, tokenizer))
        stage1 = stage1_model(stage2, root / "text_tokenizer")
        cfg = world_run(size, args.samples, args.batch, args.workers, root / "world")
        raw = build_split(cfg.datasets, "train")[NAME]  # writes the world's images first
        write_seconds = timed(lambda: write_feature_cache(stage2, cfg, root / "cache", ["train"]))
        cache_bytes = folder_bytes(root / "cache")
        section = OmegaConf.to_container(cfg.datasets)
        section[NAME]["feature_cache"] = str(root / "cache")
        cached = build_split(resolve_datasets(section), "train")[NAME]
        check_feature_caches(stage1, [cached])  # as train.py does: the cache fits both models' encoder
        check_feature_caches(stage2, [cached])
        contestants, epoch_samples = run_settings(stage1, stage2, cfg, {"raw": raw, "cached": cached}, args.steps)
        seconds = alternating(contestants, args.rounds)

    print(f"\nfeature cache, {args.size} size, {args.samples} world images of {size.image_size} px, batch "
          f"{args.batch}, {args.workers} loader worker(s), {args.threads} thread(s), {args.rounds} rounds "
          "(median (range))")
    print(f"cache written once: {write_seconds:.1f} s ({args.samples / write_seconds:.1f} images/s), "
          f"{cache_bytes / 2 ** 20:.1f} MiB")
    print(f"{'':<16}{'raw samples/s':>22}{'cached samples/s':>22}{'cached / raw':>20}")
    for work, samples in (("stage 1 epoch", epoch_samples), ("stage 2 step", args.batch * args.steps)):
        raw_s, cached_s = seconds[f"{work} raw"], seconds[f"{work} cached"]
        print(f"{work:<16}{spread([samples / s for s in raw_s]):>22}{spread([samples / s for s in cached_s]):>22}"
              f"{spread(speed_ratios(cached_s, raw_s)):>20}")


def run_settings(stage1: XLLM, stage2: XLLM, cfg: DictConfig, datasets: dict[str, Dataset],
                 steps: int) -> tuple[dict[str, Callable[[], object]], int]:
    """The timed work per setting, each warmed up by one step, and the samples of a stage-1 epoch. Stage 2's loss
    is first checked equal on the raw and the cached batch."""
    run = cfg.run
    pretrain, llm = TASKS.get("qformer_pretrain")(run), TASKS.get("llm")(run)
    stage1.train()
    stage2.train()
    collate1, collate2 = pretrain.collator(stage1, training=True), llm.collator(stage2, training=True)
    loaders = {setting: training_loader(dataset, collate1, run.batch_size, run.seed, run.num_workers)
               for setting, dataset in datasets.items()}
    batches = {setting: collate2([dataset[i] for i in range(run.batch_size)]) for setting, dataset in datasets.items()}
    with torch.no_grad():
        losses = {setting: llm.train_step(stage2, batch).loss.item() for setting, batch in batches.items()}
    print(f"stage-2 loss on one batch: raw {losses['raw']:.6f}, cached {losses['cached']:.6f}")
    if losses["raw"] != losses["cached"]:
        raise SystemExit("the cached features do not give the images' loss: the comparison would be meaningless")
    epoch = Trainer(stage1, lambda batch: pretrain.train_step(stage1, batch).loss)
    step = Trainer(stage2, lambda batch: llm.train_step(stage2, batch).loss)
    contestants = {}
    for setting, loader in loaders.items():
        epoch(next(iter(loader)))
        contestants[f"stage 1 epoch {setting}"] = lambda loader=loader: [epoch(batch) for batch in loader]
    for setting, batch in batches.items():
        step(batch)
        contestants[f"stage 2 step {setting}"] = lambda batch=batch: [step(batch) for _ in range(steps)]
    return contestants, len(loaders["raw"]) * run.batch_size


if __name__ == "__main__":
    main()
