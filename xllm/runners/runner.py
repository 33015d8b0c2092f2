"""The training loop: one stage of any modality, as the run config describes it.

The runner gets a model the builder has already made trainable (``model.trainable``), a task (the objective
and how it is scored) and data loaders whose collator made the batches; it knows no model part and no
dataset. AdamW (no decay on norms and biases), linear warm-up then cosine (or linear, or constant) schedule,
gradient accumulation that averages over the task's units exactly, optional autocast, DDP under
``torchrun``, validation loss, JSON-lines + TensorBoard logs, and checkpoints that resume to the same step,
data order and RNG state.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from xllm.common import dist
from xllm.common.checkpoint import (latest_checkpoint, load_trainer_state, load_weights, restore_rng,
                                    save_checkpoint)
from xllm.common.dtypes import AMP_DTYPES
from xllm.common.logging import MetricLogger
from xllm.runners.schedule import lr_factor

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
                 val_loader: DataLoader | None = None) -> None:
        self.run, self.task = run, task
        self.train_loader, self.val_loader = train_loader, val_loader
        self.output_dir = Path(run.output_dir)
        self.device = dist.pick_device(run.device)
        self.model = model.to(self.device)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("model.trainable names no parameter: nothing would train")
        if dist.is_main():
            print(parameter_table(self.model))
        self.wrapped = self._wrap(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, run.weight_decay), lr=run.lr,
                                           betas=tuple(run.betas))
        # A map-style dataset's sampler can start part-way through an epoch (``set_position``) for a resume.
        sampler = train_loader.sampler
        self.sampler = sampler if hasattr(sampler, "set_position") else None
        self.total_steps = self._total_steps()
        min_ratio = run.min_lr / run.lr if run.lr else 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, self.total_steps, run.warmup_steps, run.lr_schedule, min_ratio))
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.logger = MetricLogger(self.output_dir, enabled=dist.is_main())

    def _wrap(self, model):
        if dist.world_size() == 1:
            return model
        if self.run.distributed == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(model, use_orig_params=True)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=False)

    def _total_steps(self) -> int:
        if self.sampler is None:
            if self.run.max_steps is None:
                raise ValueError("run.max_steps is required for streaming (webdataset) training data")
            return self.run.max_steps
        per_epoch = len(self.train_loader) // self.run.grad_accum_steps
        if per_epoch == 0:
            raise ValueError(f"{len(self.train_loader.dataset)} training samples make no optimizer step at batch "
                             f"{self.run.batch_size} x {self.run.grad_accum_steps} accumulation")
        total = per_epoch * self.run.max_epochs
        return min(total, self.run.max_steps) if self.run.max_steps is not None else total

    # ----------------------------------------------------------------- resume

    def resume(self, folder: str | Path) -> None:
        folder = Path(folder)
        if folder.name == "latest" or folder == self.output_dir:
            found = latest_checkpoint(self.output_dir)
            if found is None:
                raise FileNotFoundError(f"no checkpoint to resume from in {self.output_dir / 'checkpoints'}")
            folder = found
        load_weights(self.model, folder)
        state = load_trainer_state(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        restore_rng(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.step, self.epoch, self.batches_done)

    def _save(self) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "step": self.step, "epoch": self.epoch, "batches_done": self.batches_done}
        folder = save_checkpoint(self.output_dir / "checkpoints" / f"step_{self.step}", self.model, state,
                                 self.run.keep_last)
        log.info("saved %s", folder)
        return folder

    # ----------------------------------------------------------------- loop

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.run.amp), enabled=self.run.amp is not None)

    def train(self) -> Path | None:
        """Runs to ``total_steps``; returns the last checkpoint folder."""
        run = self.run
        scaler = torch.amp.GradScaler(self.device.type, enabled=run.amp == "fp16")
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not dist.is_main(), desc="train",
                        dynamic_ncols=True)
        last_checkpoint = None
        window_weight, window_logs, micro = 0.0, {}, 0
        self.model.train()
        while self.step < self.total_steps:
            if self.sampler is not None:
                self.sampler.set_position(self.epoch, self.batches_done * run.batch_size)
            for batch in self.train_loader:
                self.batches_done += 1
                with self._autocast():
                    out = self.task.train_step(self.wrapped, batch.to(self.device))
                scaler.scale(out.loss * out.weight).backward()
                window_weight += out.weight
                for key, value in out.logs.items():
                    # A logged value is weighted by the micro-batch's units, or by its own (value, weight) pair
                    # when it covers only part of the batch (one task's loss in a mixture).
                    value, weight = value if isinstance(value, tuple) else (value, out.weight)
                    total, weights = window_logs.get(key, (0.0, 0.0))
                    window_logs[key] = (total + value * weight, weights + weight)
                micro += 1
                if micro % run.grad_accum_steps:
                    continue
                self._optimizer_step(scaler, window_weight)
                self.step += 1
                progress.update(1)
                if self.step % run.log_interval == 0 or self.step == self.total_steps:
                    values = {k: total / weights for k, (total, weights) in window_logs.items() if weights > 0}
                    values["lr"] = self.scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
                    self.logger.log(self.step, "train", values)
                window_weight, window_logs = 0.0, {}
                if run.val_interval and self.step % run.val_interval == 0:
                    self.validate()
                if run.save_interval and self.step % run.save_interval == 0 and dist.is_main():
                    last_checkpoint = self._save()
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch, self.batches_done = self.epoch + 1, 0
                if not run.val_interval:
                    self.validate()
                if not run.save_interval and dist.is_main():
                    last_checkpoint = self._save()
                continue
            break
        progress.close()
        if dist.is_main() and (last_checkpoint is None or last_checkpoint.name != f"step_{self.step}"):
            last_checkpoint = self._save()
        self.logger.close()
        return last_checkpoint

    def _optimizer_step(self, scaler, window_weight: float) -> None:
        # Each micro-batch added (mean loss x its token count): dividing by the window's total count gives
        # the mean over every answer token the optimizer step saw, on every rank (DDP averages over ranks).
        total = dist.all_reduce_sum(window_weight) / dist.world_size()
        scaler.unscale_(self.optimizer)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.div_(max(total, 1.0))
        if self.run.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.run.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.val_loader is None:
            return None
        self.model.eval()
        total_loss = total_weight = 0.0
        # Validation must not consume the training RNG, or a resumed run would diverge from an unbroken one.
        state = torch.get_rng_state(), random.getstate()
        for index, batch in enumerate(self.val_loader):
            if self.run.val_max_batches is not None and index >= self.run.val_max_batches:
                break
            with self._autocast():
                out = self.task.train_step(self.model, batch.to(self.device))
            total_loss += out.loss.item() * out.weight
            total_weight += out.weight
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        self.model.train()
        loss = total_loss / max(total_weight, 1)
        self.logger.log(self.step, "val", {"loss": loss})
        log.info("step %d validation loss %.4f", self.step, loss)
        return loss
