"""How a run spreads over processes: one process, DDP, FSDP2 or DeepSpeed, behind one small interface.

The runner calls the same five things whatever the strategy: ``prepare`` (wrap the model, make the optimizer),
``micro_step`` (a context around one micro-batch's forward and backward), ``backward``, ``step`` at the end of
an accumulation window, and ``trainable_state`` / ``save`` / ``load`` for checkpoints.

- DDP replicates the model; gradients are averaged in backward, once per window (``no_sync`` before).
- FSDP2 (``torch.distributed.fsdp.fully_shard``, gloo on CPU or nccl) shards every parameter: each layer of
  the frozen LLM, the encoders and the interfaces is a unit gathered for its forward (and again for the
  backward the gradient flows through), so frozen weights, trainable weights, their gradients and optimizer
  states are all divided by the world size.
- DeepSpeed ZeRO-2 / ZeRO-3 (the ``deepspeed`` extra), its JSON config in ``run.deepspeed``; the optimizer holds
  only the parameters that train.

Checkpoints: the trainable weights are gathered into one safetensors file (what ``load_model`` reads), and the
optimizer state is written by ``torch.distributed.checkpoint`` as shards that load into any world size and any
torch strategy, one process included. DeepSpeed writes its own optimizer shards (same world size to resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn

from xllm.common import dist
from xllm.common.checkpoint import WEIGHTS, check_state

log = logging.getLogger(__name__)

OPTIMIZER_DIR = "optimizer"  # torch.distributed.checkpoint shards of the optimizer state
DEEPSPEED_TAG = "deepspeed"
OptimizerFactory = Callable[[nn.Module], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]


class Strategy:
    """One process: the model as it is."""

    def __init__(self, run: DictConfig) -> None:
        self.run = run
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        """The module the forward passes run through; the optimizer is made after wrapping (FSDP2 replaces
        the parameters by sharded ones)."""
        wrapped = self.wrap(model)
        self.optimizer, self.scheduler = make_optimizer(model)
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=self.run.amp == "fp16")
        return wrapped

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def micro_step(self, wrapped: nn.Module, last: bool):
        """Around one micro-batch's forward and backward; ``last`` closes the accumulation window."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        # The loss is a mean over ``weight`` units; its sum over the window is divided by the window's units
        # in ``step``, so accumulation averages over every unit exactly.
        self.scaler.scale(loss * weight).backward()

    def step(self, window_weight: float) -> bool:
        """Updates the weights unless the gradient norm is not finite; returns whether it did. With fp16 the
        gradient scaler skips overflowing steps itself (they are expected while it finds its scale)."""
        # Each rank added (mean loss x its units); DDP and FSDP average gradients over ranks, so dividing by the
        # mean of the ranks' units gives the mean over every unit of the global batch.
        total = dist.all_reduce_sum(window_weight) / dist.world_size()
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for param in params:
            if param.grad is not None:
                param.grad.div_(max(total, 1.0))
        # Without clipping the factor is exactly 1: the norm is still measured, to catch a non-finite one.
        norm = torch.nn.utils.clip_grad_norm_(params, self.run.grad_clip or float("inf"))
        finite = self.scaler.is_enabled() or bool(torch.isfinite(full_tensor(norm)))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def save(self, model: nn.Module, folder: Path) -> None:
        """The optimizer state as ``torch.distributed.checkpoint`` shards; every rank writes its own."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        with one_process_is_intended():
            dcp.save({"optimizer": get_optimizer_state_dict(model, self.optimizer)},
                     checkpoint_id=str(folder / OPTIMIZER_DIR), no_dist=dist.world_size() == 1)

    def load(self, model: nn.Module, folder: Path) -> None:
        """The trainable weights (each rank keeps its shard of them) and the optimizer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        file = folder / WEIGHTS
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint weights not found: {file}")
        state = load_file(str(file))
        check_state(model, state, f"checkpoint {file}", missing_ok=True)
        with torch.no_grad():
            for name, tensor in state.items():
                param = model.get_parameter(name)
                param.copy_(distribute_like(tensor.to(param.dtype), param))
        if not (folder / OPTIMIZER_DIR).is_dir():
            raise FileNotFoundError(f"checkpoint {folder} has no {OPTIMIZER_DIR}/ (the optimizer state to resume)")
        state = {"optimizer": get_optimizer_state_dict(model, self.optimizer)}
        with one_process_is_intended():
            dcp.load(state, checkpoint_id=str(folder / OPTIMIZER_DIR), no_dist=dist.world_size() == 1)
        set_optimizer_state_dict(model, self.optimizer, state["optimizer"])


class DDPStrategy(Strategy):
    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=False)

    def micro_step(self, wrapped: nn.Module, last: bool):
        return contextlib.nullcontext() if last else wrapped.no_sync()


class FSDPStrategy(Strategy):
    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        # Every rank starts from rank 0's weights, as DDP makes it: freshly initialised parts (an interface) differ
        # between ranks seeded apart, and FSDP would otherwise shard a mixture of them.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor, src=0)
        # FSDP2 shards no 0-d parameter (the Q-Former's temperature): those stay whole on every rank, and their
        # gradients are averaged here as DDP would.
        self.scalars = {p for p in model.parameters() if p.dim() == 0}
        for unit in shard_units(model):
            fully_shard(unit, ignored_params=self.scalars)
        fully_shard(model, ignored_params=self.scalars)
        return model

    def micro_step(self, wrapped: nn.Module, last: bool):
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def step(self, window_weight: float) -> bool:
        for param in self.scalars:
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(dist.world_size())
        return super().step(window_weight)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP units: each layer of every layer list (the transformer blocks of the LLM, the encoders and the
    interfaces), outermost lists only. The rest (embeddings tied to the output layer, norms, query tokens,
    adapters) is the root's unit, gathered for the whole forward: objectives call the LLM's embedding table and
    interface methods (``fire``, ``image_queries``) outside those modules' own forward, where no inner unit's
    gathering would cover them, while layers are always called as modules."""
    units, inside = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(p + ".") for p in inside):
            continue
        for index, layer in enumerate(module):
            if any(True for _ in layer.parameters()) and all(layer is not u for u in units):
                units.append(layer)
                inside.append(f"{name}.{index}")
    return units


class DeepSpeedStrategy(Strategy):
    """DeepSpeed's engine steps the optimizer and the schedule at the end of each window; each micro-batch's
    loss is scaled by its share of the global batch's units before DeepSpeed's own averaging over ranks, so a
    window of one micro-batch gives the same mean as the torch strategies (over several, DeepSpeed averages the
    micro-batches' means)."""

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        try:
            import deepspeed
        except ImportError:
            raise ImportError("run.distributed: deepspeed needs DeepSpeed: pip install 'xllm[deepspeed]'") from None
        if self.run.amp == "fp16":
            raise ValueError("run.amp: fp16 with DeepSpeed: set fp16 in run.deepspeed instead, which scales the loss")
        optimizer, scheduler = make_optimizer(model)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(self.run))
        return self.engine

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        share = weight * dist.world_size() / max(dist.all_reduce_sum(weight), 1.0)
        self.engine.backward(loss * share)
        self.engine.step()  # a no-op inside the window; steps optimizer and schedule at its end

    def step(self, window_weight: float) -> bool:
        """The engine stepped in ``backward`` (skipping overflowing steps by its own rules)."""
        return True

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        import deepspeed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # ZeRO-3 partitions parameters: gather them (a no-op for ZeRO-2, whose parameters are whole).
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: param.detach().cpu().clone() for name, param in named}

    def save(self, model: nn.Module, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, model: nn.Module, folder: Path) -> None:
        if not (folder / DEEPSPEED_TAG).is_dir():
            raise FileNotFoundError(f"checkpoint {folder} has no {DEEPSPEED_TAG}/ (DeepSpeed's optimizer state): "
                                    "it was not written by a DeepSpeed run")
        self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                                    load_lr_scheduler_states=False)


def deepspeed_config(run: DictConfig) -> dict:
    """``run.deepspeed`` (a mapping, or the path of a JSON file) completed from the run config; a value that
    contradicts the run config is an error naming both keys."""
    given = run.deepspeed
    if isinstance(given, str):
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"run.deepspeed: DeepSpeed config file {path} not found")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"run.deepspeed: {path} is not JSON ({error})") from None
    else:
        config = OmegaConf.to_container(given) if given is not None else {}
    implied = {"train_micro_batch_size_per_gpu": ("batch_size", run.batch_size),
               "gradient_accumulation_steps": ("grad_accum_steps", run.grad_accum_steps),
               "gradient_clipping": ("grad_clip", float(run.grad_clip or 0.0))}
    for key, (run_key, value) in implied.items():
        if key in config and config[key] != value:
            raise ValueError(f"run.deepspeed.{key}={config[key]} contradicts run.{run_key}={value}")
        config[key] = value
    for key in ("optimizer", "scheduler", "train_batch_size"):
        if key in config:
            raise ValueError(f"run.deepspeed.{key}: the run config sets it (run.lr, run.lr_schedule, "
                             "run.batch_size); remove it from the DeepSpeed config")
    config.setdefault("zero_optimization", {"stage": 2})
    return config


@contextlib.contextmanager
def one_process_is_intended():
    """torch.distributed.checkpoint warns that it assumes a single process: here it was meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on the CPU; every rank calls it (sharded ones are gathered)."""
    return {name: full_tensor(param).detach().cpu().contiguous()
            for name, param in model.named_parameters() if param.requires_grad}


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter gathered whole; a plain one as it is."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def distribute_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut as ``param`` is sharded (this rank's part of it); whole for a plain parameter."""
    if not hasattr(param, "device_mesh"):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)


def make_strategy(run: DictConfig) -> Strategy:
    if dist.world_size() == 1:
        return Strategy(run)
    return {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}[run.distributed](run)
