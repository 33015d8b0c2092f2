"""The training loop: one stage of any modality, as the run config describes it.

The runner gets a model the builder has already made trainable (``model.trainable``), a task (the objective
and how it is scored) and data loaders whose collator made the batches; it knows no model part and no
dataset. AdamW (no decay on norms and biases), linear warm-up then cosine (or linear, or constant) schedule,
gradient accumulation that averages over the task's units exactly, optional autocast, DDP, FSDP2 or
DeepSpeed under ``torchrun`` (``xllm.runners.parallel``), validation loss, JSON-lines + TensorBoard logs with
every value reduced over ranks, and checkpoints that resume to the same step, data order and RNG state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from xllm.common import dist
from xllm.common.checkpoint import WEIGHTS, latest_checkpoint, library_version, publish, staging_folder
from xllm.common.dtypes import AMP_DTYPES
from xllm.common.logging import MetricLogger
from xllm.runners.parallel import make_strategy
from xllm.runners.schedule import lr_factor

STATE = "trainer_state.pt"  # scheduler, step, epoch, samples seen: tensors and plain containers only
MANIFEST = "manifest.json"  # what wrote the checkpoint: library version, the model config and its hash
# Model options that change memory or speed but no weight: a run may resume with them changed.
RESUMABLE_CHANGES = ("activation_checkpointing", "compile", "frozen_dtype", "llm.dtype")

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors): decaying them only fights the normalisation."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def parameter_table(model: nn.Module, depth: int = 2) -> str:
    """A table of trainable and frozen parameter counts per module, ``depth`` name levels deep."""
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        key = ".".join(name.split(".")[:depth])
        counts = rows.setdefault(key, [0, 0])
        counts[0 if param.requires_grad else 1] += param.numel()
    width = max([len(k) for k in rows] + [6])
    lines = [f"{'module':<{width}}  {'trainable':>12}  {'frozen':>12}", "-" * (width + 28)]
    for key, (train, frozen) in rows.items():
        lines.append(f"{key:<{width}}  {train:>12,}  {frozen:>12,}")
    total_train = sum(v[0] for v in rows.values())
    total_frozen = sum(v[1] for v in rows.values())
    lines += ["-" * (width + 28), f"{'total':<{width}}  {total_train:>12,}  {total_frozen:>12,}"]
    return "\n".join(lines)


class Runner:
    def __init__(self, run: DictConfig, model: nn.Module, task, train_loader: DataLoader,
                 val_loader: DataLoader | None = None, dropped: list[dict] | None = None) -> None:
        """``dropped``: the training records dropped while their annotations were read
        (``xllm.datasets.guard.dropped_records``), listed with the replaced ones in ``bad_samples.jsonl``."""
        self.run, self.task = run, task
        self.dropped = list(dropped or [])
        self.train_loader, self.val_loader = train_loader, val_loader
        self.output_dir = Path(run.output_dir)
        self.device = dist.pick_device(run.device)
        self.model = model.to(self.device)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("model.trainable names no parameter: nothing would train")
        if dist.is_main():
            print(parameter_table(self.model))
        # Every rank runs every modality at every step (a dummy input where its batch has none): collectives
        # would otherwise fall out of step when one rank's batch is speech and another's images.
        self.model.every_modality_every_step = dist.world_size() > 1
        # The position in the training order: a map-style sampler (or a stream) re-enters it on resume.
        self.data = next((source for source in (train_loader.sampler, train_loader.dataset)
                          if hasattr(source, "set_position")), None)
        self.total_steps = self._total_steps()
        self.strategy = make_strategy(run)
        self.wrapped = self.strategy.prepare(self.model, self._optimizer)
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.validated_at: int | None = None
        self.val_loss: float | None = None  # the latest validation loss, recorded in each checkpoint's manifest
        self.nan_skips = 0  # steps in a row whose loss or gradient norm was not finite
        self.bad_samples: list[dict] = []  # unreadable samples this rank replaced (xllm.datasets.guard)
        self.bad_total = self.read_total = 0.0  # every rank's, since the run (or its resume) started
        self.logger = MetricLogger(self.output_dir, enabled=dist.is_main())

    def _optimizer(self, model: nn.Module):
        run = self.run
        optimizer = torch.optim.AdamW(param_groups(model, run.weight_decay), lr=run.lr, betas=tuple(run.betas))
        min_ratio = run.min_lr / run.lr if run.lr else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, self.total_steps, run.warmup_steps, run.lr_schedule, min_ratio))
        return optimizer, scheduler

    def _total_steps(self) -> int:
        if isinstance(self.train_loader.dataset, IterableDataset):
            if self.run.max_steps is None:
                raise ValueError("run.max_steps is required for streaming (webdataset) training data")
            return self.run.max_steps
        per_epoch = len(self.train_loader) // self.run.grad_accum_steps
        if per_epoch == 0:
            raise ValueError(f"{len(self.train_loader.dataset)} training samples make no optimizer step at batch "
                             f"{self.run.batch_size} x {self.run.grad_accum_steps} accumulation x "
                             f"{dist.world_size()} processes")
        total = per_epoch * self.run.max_epochs
        return min(total, self.run.max_steps) if self.run.max_steps is not None else total

    # ----------------------------------------------------------------- checkpoints

    def _samples_per_batch(self) -> int:
        return self.run.batch_size * dist.world_size()

    def resume(self, folder: str | Path) -> None:
        """Weights, optimizer, schedule, position in the data and each rank's RNG from a checkpoint folder (or
        the run's latest). The torch strategies resume with any world size whose global batch divides the
        samples already seen; each rank without a saved RNG state of its own is seeded from the step."""
        folder = Path(folder)
        if folder.name == "latest" or folder == self.output_dir:
            found = latest_checkpoint(self.output_dir)
            if found is None:
                raise FileNotFoundError(f"no checkpoint to resume from in {self.output_dir / 'checkpoints'}")
            folder = found
        if not (folder / STATE).is_file():
            raise FileNotFoundError(f"resume folder {folder} has no {STATE}")
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        samples = state["samples_done"]
        if samples % self._samples_per_batch():
            raise ValueError(f"{folder}: {samples} samples of epoch {state['epoch']} seen, which {dist.world_size()} "
                             f"processes x batch {self.run.batch_size} cannot continue from exactly")
        grouped_for, saved_for = getattr(self.data, "global_batch", None), state.get("global_batch")
        if grouped_for is not None and saved_for is not None and grouped_for != saved_for:
            raise ValueError(f"{folder}: batches grouped by length depend on the global batch, {saved_for} samples "
                             f"when saved and {grouped_for} now ({dist.world_size()} processes x batch "
                             f"{self.run.batch_size}); keep it (run.global_batch_size) to resume exactly")
        check_manifest(folder, self.model)
        self.strategy.load(self.model, folder)
        self.strategy.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_done = samples // self._samples_per_batch()
        rng_file = folder / f"rng_{dist.rank()}.pt"
        if rng_file.is_file():
            restore_rng(torch.load(rng_file, map_location="cpu", weights_only=True))
        else:
            log.warning("%s holds no RNG state for rank %d: seeding it from the step", folder, dist.rank())
            torch.manual_seed(self.run.seed + dist.rank() + 1000 * self.step)
            random.seed(self.run.seed + dist.rank() + 1000 * self.step)
        self.logger.cut_back(self.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.step, self.epoch, self.batches_done)

    def _save(self) -> Path:
        """Every rank writes its part into the staging folder; rank 0 writes the rest and publishes it."""
        folder = self.output_dir / "checkpoints" / f"step_{self.step}"
        staging = staging_folder(folder)
        if dist.is_main():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        weights = self.strategy.trainable_state(self.model)
        bad = [name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all())]
        if bad:  # the same on every rank: the weights are whole
            raise NonFiniteError(f"step {self.step}: trainable weights are not finite ({', '.join(bad[:5])}); no "
                                 f"checkpoint written, the last one ({latest_checkpoint(self.output_dir)}) is kept")
        self.strategy.save(self.model, staging)
        torch.save(rng_state(), staging / f"rng_{dist.rank()}.pt")
        if dist.is_main():
            save_file(weights, str(staging / WEIGHTS))
            (staging / MANIFEST).write_text(json.dumps(manifest(self.model, self.step, self.val_loss), indent=1))
            torch.save({"scheduler": self.strategy.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                        "samples_done": self.batches_done * self._samples_per_batch(),
                        "world_size": dist.world_size(), "global_batch": self._samples_per_batch()}, staging / STATE)
        dist.barrier()
        if dist.is_main():
            publish(folder, self.run.keep_last, best_checkpoint if self.run.keep_best else None)
            log.info("saved %s", folder)
        dist.barrier()
        return folder

    # ----------------------------------------------------------------- loop

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.run.amp), enabled=self.run.amp is not None)

    def train(self) -> Path | None:
        """Runs to ``total_steps``; returns the last checkpoint folder."""
        run = self.run
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not dist.is_main(), desc="train",
                        dynamic_ncols=True)
        last_checkpoint = None
        window_weight, window_logs, window_ids, window_finite, micro = 0.0, {}, [], True, 0
        window_bad = window_read = 0
        self.model.train()
        while self.step < self.total_steps:
            if self.data is not None:
                self.data.set_position(self.epoch, self.batches_done * self._samples_per_batch())
            for batch in self.train_loader:
                self.batches_done += 1
                micro += 1
                closes_window = micro % run.grad_accum_steps == 0
                with self.strategy.micro_step(self.wrapped, closes_window):
                    with self._autocast():
                        out = self.task.train_step(self.wrapped, batch.to(self.device))
                    self.strategy.backward(out.loss, out.weight)
                window_weight += out.weight
                window_ids += batch.ids
                window_read += len(batch)
                self._note_bad(batch.bad)
                window_bad += len(batch.bad)
                window_finite &= bool(torch.isfinite(out.loss.detach()))
                for key, value in out.logs.items():
                    # A logged value is weighted by the micro-batch's units, or by its own (value, weight) pair
                    # when it covers only part of the batch (one task's loss in a mixture).
                    value, weight = value if isinstance(value, tuple) else (value, out.weight)
                    total, weights = window_logs.get(key, (0.0, 0.0))
                    window_logs[key] = (total + value * weight, weights + weight)
                if not closes_window:
                    continue
                # Every rank's counts, on every rank, in one collective per step.
                bad, read, non_finite = dist.all_reduce_sums([window_bad, window_read, float(not window_finite)])
                self._check_bad_fraction(bad, read)
                stepped = self.strategy.step(window_weight)
                self._check_finite(stepped and non_finite == 0, window_ids)
                self.step += 1
                progress.update(1)
                if self.step % run.log_interval == 0 or self.step == self.total_steps:
                    values = weighted_means(dist.reduce_weighted(window_logs))
                    values["lr"] = self.strategy.scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
                    self.logger.log(self.step, "train", values)
                window_weight, window_logs, window_ids, window_finite, window_bad, window_read = 0.0, {}, [], True, 0, 0
                if run.val_interval and self.step % run.val_interval == 0:
                    self.validate()
                if run.save_interval and self.step % run.save_interval == 0:
                    last_checkpoint = self._save()
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch, self.batches_done = self.epoch + 1, 0
                if not run.val_interval:
                    self.validate()
                if not run.save_interval:
                    last_checkpoint = self._save()
                continue
            break
        progress.close()
        if self.validated_at != self.step:  # the run ended inside an epoch (or between intervals): its final figure
            self.validate()
        if last_checkpoint is None or last_checkpoint.name != f"step_{self.step}":
            last_checkpoint = self._save()
        self._report_bad()
        self.logger.close()
        return last_checkpoint

    def _note_bad(self, problems: list[dict]) -> None:
        for problem in problems:
            log.warning("unreadable sample replaced: dataset %s record %s: %s", problem["dataset"], problem["record"],
                        problem["error"])
        self.bad_samples += problems

    def _check_bad_fraction(self, bad: float, read: float) -> None:
        """Stops the run, before the optimizer step, once more than ``run.max_bad_fraction`` of the samples
        read so far (``bad`` and ``read``: this window's, every rank's) were unreadable."""
        self.bad_total += bad
        self.read_total += read
        limit = self.run.max_bad_fraction
        if limit is not None and self.bad_total > limit * self.read_total:
            first = self.bad_samples[0] if self.bad_samples else {"dataset": "?", "record": "?", "error": "?"}
            raise BadDataError(f"{int(self.bad_total)} of {int(self.read_total)} samples read so far were unreadable "
                               f"({100 * self.bad_total / self.read_total:.1f} %), more than run.max_bad_fraction="
                               f"{limit}; first: dataset {first['dataset']} record {first['record']}: {first['error']}")

    def _report_bad(self) -> None:
        """Every unreadable record the run met (every rank's), once each, in ``bad_samples.jsonl``: those
        dropped when the annotations were read (``"dropped": true``, ``record`` their index in the file), then
        those replaced in training (``record`` the dataset's index)."""
        gathered = dist.gather_objects(self.bad_samples)
        if not dist.is_main() or not (any(gathered) or self.dropped):
            return
        distinct = {(p["dataset"], p["record"]): p for part in gathered for p in part}
        replaced = [p for _, p in sorted(distinct.items())]
        path = self.output_dir / "bad_samples.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in self.dropped + replaced))
        log.warning("%d unreadable records were dropped when their annotations were read and %d replaced in "
                    "training (%d times); listed in %s", len(self.dropped), len(distinct), sum(map(len, gathered)),
                    path)

    def _check_finite(self, finite: bool, sample_ids: list[str]) -> None:
        """A step whose loss or gradient norm is not finite left the weights as they were: ``run.on_nan: stop``
        ends the run there, ``skip`` goes on, up to ``run.max_nan_skips`` such steps in a row."""
        if finite:
            self.nan_skips = 0
            return
        self.nan_skips += 1
        shown = ", ".join(map(str, sample_ids[:8])) + (" ..." if len(sample_ids) > 8 else "")
        problem = f"step {self.step + 1}: the loss or the gradient norm is not finite (samples {shown})"
        if self.run.on_nan == "stop" or self.nan_skips > self.run.max_nan_skips:
            more = "" if self.run.on_nan == "stop" else f" for {self.nan_skips} steps in a row"
            raise NonFiniteError(f"{problem}{more}; the weights were not updated, and the last checkpoint "
                                 f"({latest_checkpoint(self.output_dir) or 'none yet'}) holds the last good ones")
        log.warning("%s: step skipped (%d in a row; run.max_nan_skips=%d)", problem, self.nan_skips,
                    self.run.max_nan_skips)

    @torch.no_grad()
    def validate(self) -> float | None:
        """The loss over the validation batches, through the wrapped model (FSDP's shards are gathered); every
        rank reads the same batches, so it is the same on every rank."""
        if self.val_loader is None:
            return None
        self.validated_at = self.step
        self.model.eval()
        total_loss = total_weight = 0.0
        # Validation must not consume the training RNG, or a resumed run would diverge from an unbroken one.
        state = torch.get_rng_state(), random.getstate()
        for index, batch in enumerate(self.val_loader):
            if self.run.val_max_batches is not None and index >= self.run.val_max_batches:
                break
            with self._autocast():
                out = self.task.train_step(self.wrapped, batch.to(self.device))
            total_loss += out.loss.item() * out.weight
            total_weight += out.weight
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        self.model.train()
        loss = total_loss / max(total_weight, 1)
        self.val_loss = loss
        self.logger.log(self.step, "val", {"loss": loss})
        log.info("step %d validation loss %.4f", self.step, loss)
        return loss


class BadDataError(RuntimeError):
    """More of the training data was unreadable than ``run.max_bad_fraction`` allows."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; nothing non-finite was saved."""


def manifest(model: nn.Module, step: int, val_loss: float | None) -> dict:
    config = model_config(model)
    return {"xllm_version": library_version(), "step": step, "world_size": dist.world_size(), "val_loss": val_loss,
            "model_config": config, "model_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True)
                                                                           .encode()).hexdigest()}


def best_checkpoint(folders: list[Path]) -> Path | None:
    """The step folder whose manifest records the lowest validation loss (``run.keep_best``)."""
    losses = {}
    for folder in folders:
        file = folder / MANIFEST
        loss = json.loads(file.read_text())["val_loss"] if file.is_file() else None
        if loss is not None and math.isfinite(loss):
            losses[folder] = loss
    return min(losses, key=losses.get) if losses else None


def check_manifest(folder: Path, model: nn.Module) -> None:
    """A checkpoint resumes only into the model config that wrote it: the differing keys are the error."""
    file = folder / MANIFEST
    if not file.is_file():
        log.warning("%s has no %s: the model config it was written with cannot be checked", folder, MANIFEST)
        return
    saved, current = flatten(json.loads(file.read_text())["model_config"]), flatten(model_config(model))
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)
                       and not any(k == c or k.startswith(c + ".") for c in RESUMABLE_CHANGES))
    if differing:
        listing = "; ".join(f"model.{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in differing[:8])
        raise ValueError(f"{folder} was written by another model config ({len(differing)} keys differ): {listing}")


def model_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return OmegaConf.to_container(config) if isinstance(config, DictConfig) else {}


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def weighted_means(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {key: total / weight for key, (total, weight) in sums.items() if weight > 0}


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
