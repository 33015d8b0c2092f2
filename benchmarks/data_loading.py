"""Data loading against the model's consumption: does the training DataLoader keep up with the training steps?

    PYTHONPATH=. python benchmarks/data_loading.py [--batches 16] [--steps 4] [--rounds 3] [--workers N] \\
        [--threads 1] [--image-cfg tiny/stage2_image.yaml] [--speech-cfg tiny/stage2_speech.yaml] \\
        [--image-options k=v ...] [--speech-options k=v ...]

Each config (stage 2 image and stage 2 speech of the tiny tier by default; ``--*-options`` override its keys as
``train.py --options`` does) is set up as ``train.py`` sets it up: the zoo components it names are built when
missing, the synthetic world is written on first use, the model is built, and the training loader is
``training_loader`` over the training set with the task's collator, the config's batch size, ``run.num_workers``
workers (its default, 0: loading in the training process; ``--workers`` overrides it) and its
``run.group_by_length``. ``model.checkpoint`` is set to null: trained weights do not change the throughput, and the
configs' checkpoints need not exist yet.

Loading: samples/s of ``--batches`` batches drawn from a fresh iterator over the loader, after its first batch
(which includes starting the workers; the batches they prefetched meanwhile count in, so draw many more than
2 x workers). Consumption: samples/s of training steps (forward through the task's
``train_step``, backward, AdamW over the trainable parameters; full precision, no gradient clipping) over
``--steps`` batches loaded beforehand. Rounds alternate the two, each after one untimed step; the table gives both
rates (median over rounds and its range) and loading / consumption (median and range over the rounds' pairs). Above
1, the loader outpaces the model; with 0 workers, loading and stepping add up: a training step then takes
1/loading + 1/consumption seconds per sample.
"""

from __future__ import annotations

import argparse
from itertools import islice

import torch

from blip2_step import Trainer
from rounds import spread, timed
from xllm import zoo
from xllm.config import load_config
from xllm.datasets.build import build_split
from xllm.datasets.loader import training_loader
from xllm.datasets.mixture import training_set
from xllm.models.builder import build_model
from xllm.tasks.registry import TASKS

UNTRAINED = ["model.checkpoint=null"]


def measure(cfg_path: str, options: list[str], args: argparse.Namespace) -> dict:
    """Loading and consumption seconds per round of one config, with its batch size and worker count."""
    cfg = load_config(cfg_path, UNTRAINED + options)
    run = cfg.run
    workers = run.num_workers if args.workers is None else args.workers
    zoo.ensure(cfg)
    model = build_model(cfg.model).train()
    task = TASKS.get(run.task)(run)
    dataset = training_set(build_split(cfg.datasets, "train"), cfg.datasets, run.seed)
    loader = training_loader(dataset, task.collator(model, training=True), run.batch_size, run.seed, workers,
                             run.group_by_length)
    if len(loader) < args.batches + 1:
        raise SystemExit(f"{cfg_path}: {len(loader)} batches per epoch, fewer than --batches {args.batches} + 1")
    preloaded = list(islice(loader, args.steps))
    trainer = Trainer(model, lambda batch: task.train_step(model, batch).loss)
    trainer(preloaded[0])

    def consume() -> None:
        for batch in preloaded:
            trainer(batch)

    seconds: dict[str, list[float]] = {"load": [], "consume": []}
    for _ in range(args.rounds):
        batches = iter(loader)
        next(batches)  # starts the workers: not a steady rate
        seconds["load"].append(timed(lambda: sum(1 for _ in islice(batches, args.batches))))
        seconds["consume"].append(timed(consume))
    return {"batch": run.batch_size, "workers": workers, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-cfg", default="tiny/stage2_image.yaml")
    parser.add_argument("--image-options", nargs="+", default=[], help="overrides of the image config, key=value")
    parser.add_argument("--speech-cfg", default="tiny/stage2_speech.yaml")
    parser.add_argument("--speech-options", nargs="+", default=[], help="overrides of the speech config, key=value")
    parser.add_argument("--batches", type=int, default=16, help="batches loaded per round")
    parser.add_argument("--steps", type=int, default=4, help="training steps per round, on as many loaded batches")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the config's run.num_workers)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"image": measure(args.image_cfg, args.image_options, args),
               "speech": measure(args.speech_cfg, args.speech_options, args)}

    print(f"\ntraining data loading against training steps, {args.threads} thread(s), {args.rounds} rounds of "
          f"{args.batches} loaded batches and {args.steps} steps (median (range))")
    print(f"{'config':<28}{'batch':>6}{'workers':>9}{'loading samples/s':>26}{'steps samples/s':>26}"
          f"{'loading / steps':>22}")
    for modality, cfg_path in (("image", args.image_cfg), ("speech", args.speech_cfg)):
        result = results[modality]
        batch, seconds = result["batch"], result["seconds"]
        loading = [args.batches * batch / s for s in seconds["load"]]
        consumption = [args.steps * batch / s for s in seconds["consume"]]
        ratios = [load / steps for load, steps in zip(loading, consumption)]  # per round
        print(f"{cfg_path:<28}{batch:>6}{result['workers']:>9}{spread(loading, 1):>26}"
              f"{spread(consumption, 1):>26}{spread(ratios):>22}")
    print("above 1 the loader outpaces the steps; with 0 workers both run in the training process, one after the other")


if __name__ == "__main__":
    main()
