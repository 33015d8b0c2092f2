"""Several processes on CPU (gloo): DDP and FSDP2 give the 1-process gradients and loss curve with the same global
batch, mixed batches keep every rank in step, resume is exact, and bad starts fail on every rank.

Processes are forked from the test (``start_processes(..., "fork")``): the children need no fresh interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import xllm.models.objectives.qformer as qformer_objective
from xllm.common import dist
from xllm.common.config import ConfigError
from xllm.config import load_config, per_process_batch_size
from xllm.datasets.build import build_split
from xllm.datasets.guard import GuardedDataset
from xllm.datasets.lengths import record_lengths
from xllm.datasets.loader import EpochSampler, LengthGroupedSampler, evaluation_loader, training_loader
from xllm.datasets.mixture import MixtureDataset
from xllm.models.builder import build_model
from xllm.runners.parallel import full_tensor
from xllm.runners.runner import Runner
from xllm.tasks.registry import TASKS

REPO = Path(__file__).resolve().parents[1]


def write_cfg(folder: Path, model: dict, datasets: dict, **run) -> Path:
    config = {"model": model, "datasets": datasets,
              "run": {"output_dir": str(folder / "run"), "log_interval": 1, "lr": 1e-3, "warmup_steps": 0,
                      "seed": 3, "threads": 1, **run}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def first_step_and_losses(cfg_path: str, results, rank: int | None = None, init: str | None = None) -> None:
    """Trains the config; records the first optimizer step's gradients (whole) and rank 0's logged losses."""
    if init is not None:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = load_config(cfg_path)
    torch.manual_seed(rank or 0)  # as train.py seeds: each rank apart; every strategy starts from rank 0's weights
    model = build_model(cfg.model)
    task = TASKS.get(cfg.run.task)(cfg.run)
    train = training_loader(build_split(cfg.datasets, "train")["world"], task.collator(model, training=True),
                            cfg.run.batch_size, cfg.run.seed, group_by_length=cfg.run.group_by_length)
    runner = Runner(cfg.run, model, task, train)
    if cfg.run.resume:
        runner.resume(cfg.run.resume)
    optimizer = runner.strategy.optimizer
    real_step, grads = optimizer.step, {}

    def recording_step(*args, **kwargs):
        if not grads:
            grads.update({n: full_tensor(p.grad).clone() for n, p in runner.model.named_parameters()
                          if p.requires_grad and p.grad is not None})
        return real_step(*args, **kwargs)

    optimizer.step = recording_step
    runner.train()
    if dist.is_main():
        log = Path(cfg.run.output_dir) / "log.jsonl"
        results["grads"] = grads
        results["losses"] = [row["loss"] for row in map(json.loads, log.read_text().splitlines())
                             if row["split"] == "train"]
    if init is not None:
        torch.distributed.destroy_process_group()


def in_two_processes(fn, *args, tmp_path: Path) -> dict:
    os.environ.pop("WORLD_SIZE", None)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank_entry, args=(fn, args, results, str(tmp_path / f"init{time.time_ns()}")), nprocs=2,
                           start_method="fork")
        return dict(results)


def _rank_entry(rank: int, fn, args, results, init: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")  # what torchrun sets; DeepSpeed reads it
    fn(*args, results, rank=rank, init=init)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def argmax_negatives(monkeypatch):
    """ITM's hard negatives drawn by argmax: a draw depends on each rank's RNG, an argmax only on the batch."""
    monkeypatch.setattr(qformer_objective, "sample_hard_negatives",
                        lambda similarity, positives: similarity.masked_fill(positives, float("-inf")).argmax(1))


# Batches grouped by length are dealt as the shuffled ones: two processes see the one process's global batches.
@pytest.mark.parametrize("stage, strategy, grouped", [("stage2", "ddp", False), ("stage2", "fsdp", False),
                                                      ("stage1", "ddp", False), ("stage1", "fsdp", False),
                                                      ("stage2", "ddp", True)])
def test_two_processes_give_the_one_process_gradients_and_losses(stage, strategy, grouped, tmp_path, micro_model_cfg,
                                                                 stage1_cfg, micro_world, argmax_negatives):
    model, task = (micro_model_cfg, "llm") if stage == "stage2" else (stage1_cfg, "qformer_pretrain")
    datasets = {"world": {"builder": "coco_caption", **micro_world}}
    one = {}
    first_step_and_losses(str(write_cfg(tmp_path / "one", model, datasets, task=task, batch_size=4,
                                        max_steps=4, group_by_length=grouped)), one)
    two = in_two_processes(first_step_and_losses, str(write_cfg(
        tmp_path / "two", model, datasets, task=task, batch_size=2, max_steps=4, distributed=strategy,
        group_by_length=grouped)), tmp_path=tmp_path)
    assert set(two["grads"]) == set(one["grads"]) and one["grads"]
    flat_one = torch.cat([g.flatten() for _, g in sorted(one["grads"].items())])
    flat_two = torch.cat([g.flatten() for _, g in sorted(two["grads"].items())])
    assert relative(flat_two, flat_one) <= 1e-5
    assert len(two["losses"]) == len(one["losses"]) == 4
    for mine, reference in zip(two["losses"], one["losses"]):
        assert abs(mine - reference) <= 1e-4 * abs(reference), (two["losses"], one["losses"])


SIGNAL = {"encoder": {"name": "signal", "channels": 4},
          "interface": {"name": "sequence", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                        "num_query_tokens": 3, "max_steps": 32}}


def mixed_step(cfg_path: str, results, rank: int | None = None, init: str | None = None) -> None:
    """One step where rank 0's batch holds images only and rank 1's signals only (one process: both)."""
    if init is not None:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    task = TASKS.get("llm")(cfg.run)
    sets = build_split(cfg.datasets, "train")
    images, signals = [sets["caption"][i] for i in range(2)], [sets["status"][i] for i in range(2)]
    samples = images + signals if rank is None else (images if rank == 0 else signals)
    loader = torch.utils.data.DataLoader(samples, batch_size=len(samples), collate_fn=task.collator(model, True))
    runner = Runner(cfg.run, model, task, loader)
    real_step, grads = runner.strategy.optimizer.step, {}

    def recording_step(*args, **kwargs):
        grads.update({n: full_tensor(p.grad).clone() for n, p in runner.model.named_parameters()
                      if p.requires_grad and p.grad is not None})
        return real_step(*args, **kwargs)

    runner.strategy.optimizer.step = recording_step
    runner.train()
    if dist.is_main():
        results["grads"] = grads
    if init is not None:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_step_with_images_on_one_rank_and_signals_on_the_other(strategy, tmp_path, micro_model_cfg, micro_world):
    model = dict(micro_model_cfg, model_type="tiny_signal",
                 modalities={"image": micro_model_cfg["modalities"]["image"], "signal": SIGNAL},
                 trainable=["interfaces", "adapters"])
    datasets = {"caption": {"builder": "coco_caption", **micro_world},
                "status": {"builder": "signal_text", "storage": str(tmp_path / "signals"),
                           "world": {"seed": 0, "num_train": 4, "num_val": 2, "num_test": 2, "steps": 16}}}
    one = {}
    mixed_step(str(write_cfg(tmp_path / "one", model, datasets, max_steps=1)), one)
    # Without the dummy pass (XLLM.encode), DDP stops on parameters that got no gradient on one rank, and FSDP
    # waits for ever in an all-gather that the other rank never starts.
    two = in_two_processes(mixed_step, str(write_cfg(tmp_path / "two", model, datasets, max_steps=1,
                                                     distributed=strategy)), tmp_path=tmp_path)
    assert set(two["grads"]) == set(one["grads"])
    for name, grad in one["grads"].items():
        assert relative(two["grads"][name], grad) <= 1e-5, name


def torchrun(cfg: Path, nproc: int, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / "train.py"), "--cfg-path", str(cfg), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def kill_after_first_checkpoint(process: subprocess.Popen, checkpoints: Path) -> None:
    deadline = time.time() + 300
    while not any(checkpoints.glob("step_*[0-9]")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: make it longer"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()


def losses(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


@pytest.mark.parametrize("builder, strategy", [("coco_caption", "fsdp"), ("webdataset_caption", "ddp")])
def test_a_killed_two_process_run_resumes_to_the_unbroken_weights(builder, strategy, tmp_path, micro_model_cfg,
                                                                   micro_world):
    datasets = {"world": {"builder": builder, **micro_world, "shuffle_buffer": 8} if builder != "coco_caption"
                else {"builder": builder, **micro_world}}
    run = {"batch_size": 2, "max_steps": 60, "max_epochs": 100, "save_interval": 5, "keep_last": 20, "distributed": strategy,
           "val_interval": 1000}
    unbroken_cfg = write_cfg(tmp_path / "unbroken", micro_model_cfg, datasets, **run)
    finish(torchrun(unbroken_cfg, 2))
    broken_cfg = write_cfg(tmp_path / "broken", micro_model_cfg, datasets, **run)
    kill_after_first_checkpoint(torchrun(broken_cfg, 2), tmp_path / "broken" / "run" / "checkpoints")
    finish(torchrun(broken_cfg, 2, "--resume"))
    final = "checkpoints/step_60/model.safetensors"
    unbroken = load_file(str(tmp_path / "unbroken" / "run" / final))
    resumed = load_file(str(tmp_path / "broken" / "run" / final))
    assert unbroken.keys() == resumed.keys()
    for name, tensor in unbroken.items():
        assert torch.equal(resumed[name], tensor), name
    if strategy == "fsdp":
        # The sharded checkpoint resumes in one process holding the same global batch.
        one_cfg = write_cfg(tmp_path / "one", micro_model_cfg, datasets, **{**run, "batch_size": 4, "max_steps": 8})
        finish(subprocess.Popen([sys.executable, str(REPO / "train.py"), "--cfg-path", str(one_cfg), "--resume",
                                 str(tmp_path / "unbroken" / "run" / "checkpoints" / "step_5")], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True))
        two, one = losses(tmp_path / "unbroken" / "run"), losses(tmp_path / "one" / "run")
        assert sorted(one) == [6, 7, 8]
        # The step after the resume matches to 1e-4; later ones drift as AdamW amplifies rounding differences.
        for step, tolerance in ((6, 1e-4), (7, 1e-3), (8, 1e-3)):
            assert abs(one[step] - two[step]) <= tolerance * two[step], (step, one[step], two[step])


def test_a_global_batch_is_shared_out_or_refused():
    run = OmegaConf.create({"batch_size": 8, "global_batch_size": 12, "grad_accum_steps": 2})
    assert per_process_batch_size(run, 3) == 2 and per_process_batch_size(run, 1) == 6
    with pytest.raises(ConfigError, match=r"run.global_batch_size=12 does not divide by 4 processes x "
                                          r"run.grad_accum_steps=2"):
        per_process_batch_size(run, 4)
    assert per_process_batch_size(OmegaConf.create({"batch_size": 8, "global_batch_size": None}), 4) == 8


def bad_start(case: str, folder: str, results, rank: int | None = None, init: str | None = None) -> None:
    """Records the error each rank raises; a rank left waiting would hang the test."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        if case == "config":
            dist.check_same_everywhere(f"run: {{lr: {rank}}}", "config")
        else:
            cfg = load_config(Path(folder) / "cfg.yaml")
            torch.manual_seed(0)
            model = build_model(cfg.model)
            task = TASKS.get("llm")(cfg.run)
            train = training_loader(build_split(cfg.datasets, "train")["world"], task.collator(model, True), 2, 0)
            Runner(cfg.run, model, task, train).resume(Path(folder) / "foreign")
        results[rank] = "no error"
    except Exception as error:  # what each rank reports is the point
        results[rank] = f"{type(error).__name__}: {error}"
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", ["config", "checkpoint"])
def test_bad_starts_fail_on_every_rank_without_a_hang(case, tmp_path, micro_model_cfg, micro_world):
    write_cfg(tmp_path, micro_model_cfg, {"world": {"builder": "coco_caption", **micro_world}}, batch_size=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"interfaces.image.not_a_parameter": torch.zeros(3)}, str(foreign / "model.safetensors"))
    torch.save({"scheduler": {}, "step": 1, "epoch": 0, "samples_done": 0, "world_size": 2},
               foreign / "trainer_state.pt")
    results = in_two_processes(bad_start, case, str(tmp_path), tmp_path=tmp_path)
    expected = "ranks [1] were started with a different config" if case == "config" else \
        "unexpected key interfaces.image.not_a_parameter"
    assert all(expected in results[rank] for rank in (0, 1)), results


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_gives_the_one_process_losses(stage, tmp_path, micro_model_cfg, micro_world,
                                                     argmax_negatives):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'xllm[deepspeed]'")
    datasets = {"world": {"builder": "coco_caption", **micro_world}}
    one = {}
    first_step_and_losses(str(write_cfg(tmp_path / "one", micro_model_cfg, datasets, batch_size=4, max_steps=4)),
                          one)
    run = {"batch_size": 2, "max_steps": 4, "save_interval": 2, "distributed": "deepspeed",
           "deepspeed": {"zero_optimization": {"stage": stage}}}
    two = in_two_processes(first_step_and_losses, str(write_cfg(tmp_path / "two", micro_model_cfg, datasets, **run)),
                           tmp_path=tmp_path)
    assert len(two["losses"]) == 4
    for mine, reference in zip(two["losses"], one["losses"]):
        assert abs(mine - reference) <= 1e-4 * abs(reference), (two["losses"], one["losses"])
    checkpoints = tmp_path / "two" / "run" / "checkpoints"
    weights = load_file(str(checkpoints / "step_4" / "model.safetensors"))
    assert set(weights) == set(one["grads"])  # the trainable parameters, gathered whole
    resumed = in_two_processes(first_step_and_losses, str(write_cfg(
        tmp_path / "resumed", micro_model_cfg, datasets, **run, resume=str(checkpoints / "step_2"))),
        tmp_path=tmp_path)
    assert resumed["losses"] == pytest.approx(two["losses"][2:], rel=1e-6)


def dealt(make_sampler, world: int, monkeypatch, start: int = 0) -> list[list[int]]:
    """Each rank's indices of epoch 0 from ``start`` on, as ``world`` processes see them."""
    monkeypatch.setattr(dist, "world_size", lambda: world)
    ranks = []
    for rank in range(world):
        monkeypatch.setattr(dist, "rank", lambda: rank)
        sampler = make_sampler()
        sampler.set_position(0, start)
        ranks.append(list(sampler))
    return ranks


def known_lengths(count: int = 240) -> list[float]:
    return torch.randint(1, 200, (count,), generator=torch.Generator().manual_seed(0)).tolist()


def padding_fraction(order: list[int], lengths: list[float], batch: int) -> float:
    """The share of a batch's padded positions that are padding, over the whole batches of ``order``."""
    batches = [[lengths[i] for i in order[k:k + batch]] for k in range(0, len(order) - batch + 1, batch)]
    return 1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_length_grouped_epoch_is_fixed_by_seed_and_epoch_and_dealt_once_to_disjoint_ranks(world, monkeypatch):
    lengths, batch = known_lengths(), 4
    modalities = ["speech"] * 144 + ["image"] * 96
    grouped = lambda seed=3: LengthGroupedSampler(lengths, modalities, seed, batch * world)  # noqa: E731
    ranks = dealt(grouped, world, monkeypatch)
    order = grouped().order()
    assert order == grouped().order() and sorted(order) == list(range(240))
    assert ranks == [order[rank::world] for rank in range(world)]  # dealt as EpochSampler deals its permutation
    assert sorted(i for rank in ranks for i in rank) == list(range(240))  # every sample once, on one rank
    again = grouped()
    again.set_position(1, 0)
    assert again.order() != order and grouped(seed=4).order() != order
    # Each step's samples over every rank are one modality (240 = whole global batches of both) and one length range.
    for step in range(240 // (batch * world)):
        samples = [i for rank in ranks for i in rank[step * batch:(step + 1) * batch]]
        assert len({modalities[i] for i in samples}) == 1
    alone = dealt(lambda: EpochSampler(240, 3), world, monkeypatch)
    assert [len(rank) for rank in ranks] == [len(rank) for rank in alone] == [240 // world] * world


@pytest.mark.parametrize("world", [1, 2])
def test_a_length_grouped_epoch_resumes_exactly_on_any_world_size_with_the_global_batch(world, monkeypatch):
    lengths, modalities = known_lengths(), ["speech"] * 240
    grouped = lambda: LengthGroupedSampler(lengths, modalities, 3, 8)  # noqa: E731
    unbroken = dealt(grouped, world, monkeypatch)
    batch, seen_steps = 8 // world, 5
    resumed = dealt(grouped, world, monkeypatch, start=seen_steps * 8)
    assert [rank[:seen_steps * batch] + after for rank, after in zip(unbroken, resumed)] == unbroken
    # The same global batches with one process of batch 8 and two of batch 4: a run resumes on either.
    alone = dealt(grouped, 1, monkeypatch)[0]
    for step in range(240 // 8):
        assert sorted(i for rank in unbroken for i in rank[step * batch:(step + 1) * batch]) == \
            sorted(alone[step * 8:(step + 1) * 8])


def test_length_grouped_batches_pad_less_than_shuffled_ones(monkeypatch):
    lengths = known_lengths()
    grouped = LengthGroupedSampler(lengths, ["speech"] * 240, 3, 8)
    shuffled = padding_fraction(EpochSampler(240, 3)._indices(), lengths, 8)
    assert padding_fraction(grouped._indices(), lengths, 8) < shuffled / 3


class KnownLengths(torch.utils.data.Dataset):
    """Records of given lengths and one modality, as a builder's dataset gives them (``xllm.datasets.lengths``)."""

    def __init__(self, lengths: list[float], modality: str | None) -> None:
        self.records, self.modality = lengths, modality

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {"id": index, "length": self.records[index], "modality": self.modality}

    def lengths(self) -> list[float]:
        return list(self.records)


def test_a_length_grouped_mixture_batches_one_modality_at_a_time_padding_less(monkeypatch):
    lengths = known_lengths(300)
    parts = {name: GuardedDataset(KnownLengths(lengths[start:start + 100], modality), name, "error", training=True)
             for name, start, modality in (("asr", 0, "speech"), ("masr", 100, "image+speech"),
                                           ("caption", 200, "image"))}
    mixture = MixtureDataset(parts, {"asr": 2.0, "masr": 1.0, "caption": 1.0}, seed=0)
    batches = {}
    for grouped in (False, True):
        loader = training_loader(mixture, lambda samples: samples, 4, seed=0, group_by_length=grouped)
        batches[grouped] = list(loader)
    mixed = {grouped: sum(len({s["modality"] for s in b}) > 1 for b in found) for grouped, found in batches.items()}
    assert mixed[True] <= 2 < mixed[False]  # at most the batches of what is left of each modality mix
    assert len(batches[True]) == len(batches[False]) == 75
    padding = {grouped: padding_fraction(list(range(300)), [s["length"] for b in found for s in b], 4)
               for grouped, found in batches.items()}
    assert padding[True] < padding[False] / 2


def test_a_dataset_without_lengths_is_grouped_by_modality_only(monkeypatch, caplog):
    plain = KnownLengths([5.0, 1.0, 9.0], "image")
    monkeypatch.delattr(KnownLengths, "lengths")
    with caplog.at_level("WARNING"):
        assert record_lengths(torch.utils.data.ConcatDataset([plain, KnownLengths([2.0], "speech")])) == [0.0] * 4
    assert "KnownLengths gives no record lengths: its batches are grouped by modality only" in caplog.text
