"""Process-group helpers: one code path for a single process and for ``torchrun`` launches."""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Joins the process group that ``torchrun`` describes in the environment; nothing for a single process."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    """Leaves the process group once every rank is done: a process that exits with a live gloo group can abort
    in the group's threads at interpreter exit, failing a run that finished."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(value: float) -> float:
    return all_reduce_sums([value])[0]


def all_reduce_sums(values: list[float]) -> list[float]:
    """Each value summed over ranks, in one collective."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (building the zoo, writing the synthetic world) while the others wait; then
    they run it too, finding the files in place."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def reduce_weighted(sums: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per key, (weighted total, weight) summed over ranks; ranks may hold different keys (one task's loss in a
    mixture)."""
    if not dist.is_initialized():
        return sums
    reduced: dict[str, tuple[float, float]] = {}
    for part in gather_objects(sums):
        for key, (total, weight) in part.items():
            old = reduced.get(key, (0.0, 0.0))
            reduced[key] = (old[0] + total, old[1] + weight)
    return dict(sorted(reduced.items()))


def gather_objects(value) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_everywhere(text: str, what: str) -> None:
    """Every rank raises the same error when the ranks' ``text`` (a config) differ: none is left waiting."""
    if not dist.is_initialized():
        return
    digests = gather_objects(hashlib.sha256(text.encode()).hexdigest())
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ValueError(f"ranks {differing} were started with a different {what} than rank 0 (hashes "
                         f"{digests[0][:12]} vs {digests[differing[0]][:12]}): start every process with the same one")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss reads every rank's rows: this rank's rows get the sum of all those gradients.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (of one shape on every rank) concatenated in rank order.

    Differentiable across processes: the gradient of this rank's rows sums what every rank's loss sends them,
    so a contrastive loss over gathered negatives, averaged over ranks as DDP and FSDP do, has the gradient of
    one process holding the whole batch."""
    if world_size() == 1:
        return tensor
    if not tensor.requires_grad:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(tensor)
