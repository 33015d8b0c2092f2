"""Stage-2 image training step: xllm against transformers' ``Blip2ForConditionalGeneration``, same sizes and weights.

    PYTHONPATH=. python benchmarks/blip2_step.py --size small [--rounds 5] [--steps 2] [--batch 8] [--threads 1]

Both models come from ``blip2_pair.py``: one random BLIP-2 (Llama text model), xllm's model converted from its
checkpoint folder. The script first checks that both give the same fp32 loss on the batch, then times training
steps (forward, backward, AdamW over the Q-Former, queries and projection) in one process, alternating rounds:
each round runs every setting, xllm then transformers, ``--steps`` steps each after one untimed step.

Settings: fp32; bf16 autocast (weights as stored, fp32); bf16 autocast with the frozen vision encoder and LLM stored
in bf16 (xllm's ``model.frozen_dtype: bfloat16``; transformers' frozen modules cast with ``.to``); that with both
LLMs' layers compiled for training (``model.compile: [llm]``, ``xllm.models.compiled``, on either side). The table gives
samples/s (median over rounds and its range), xllm / transformers (median and range over the rounds' pairs), and
peak memory: the weights' bytes, plus the peak of the bytes allocated during one step above those allocated before
it (torch profiler memory records). FLOPs are counted once per model and setting with
``torch.utils.flop_counter.FlopCounterMode``; achieved FLOP/s divides them by the median step time, and is set
against the machine's matmul peak measured here (a 2048 x 2048 matmul, best of 5, fp32 and bf16).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Blip2ForConditionalGeneration

from blip2_pair import (SIZES, freeze_as_stage2, hf_blip2, hf_inputs, images, parameter_bytes, save_folders,
                        step_peak_bytes, xllm_batch, xllm_model)
from rounds import speed_ratios, spread, timed

from xllm.models.compiled import compile_layers

MATMUL_SIDE = 2048
COMPILED = "frozen bf16, compiled LLM"
EAGER_TWIN = {COMPILED: "bf16 autocast, frozen bf16"}


def matmul_peak(dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` square matmuls."""
    a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, dtype=dtype), torch.randn(MATMUL_SIDE, MATMUL_SIDE, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * MATMUL_SIDE ** 3 / best


class Trainer:
    """One model's training step: forward under the setting's autocast, backward, AdamW. ``loss`` computes the
    forward pass's loss from the step's arguments (none for a fixed batch, the batch for a stream of them)."""

    def __init__(self, model: torch.nn.Module, loss: Callable[..., torch.Tensor], bf16: bool = False) -> None:
        self.model, self.loss, self.bf16 = model, loss, bf16
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def __call__(self, *inputs: object) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext():
            loss = self.loss(*inputs)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self()
        return counter.get_total_flops()


def build_trainers(size_name: str, batch_size: int, root: Path) -> dict[str, dict[str, Trainer]]:
    """Per setting, the xllm and the transformers trainer."""
    size = SIZES[size_name]
    hf = hf_blip2(size)
    blip2, llm = save_folders(hf, size, root)
    xllm_fp32 = xllm_model(size, blip2, llm).train()
    xllm_bf16 = xllm_model(size, blip2, llm, frozen_dtype="bfloat16").train()
    batch = xllm_batch(xllm_fp32, size, images(size, batch_size))
    inputs = hf_inputs(xllm_fp32, batch)
    hf.train()
    with torch.no_grad():
        ours, theirs = xllm_fp32(batch).loss.item(), hf(**inputs).loss.item()
    print(f"fp32 loss on the batch: xllm {ours:.6f}, transformers {theirs:.6f} (|difference| {abs(ours - theirs):.2e})")
    if abs(ours - theirs) > 1e-4 * abs(theirs):
        raise SystemExit("the two models do not compute the same loss: the comparison would be meaningless")

    def frozen_bf16_copy() -> Blip2ForConditionalGeneration:
        copy = hf_blip2(size)
        copy.load_state_dict(hf.state_dict())
        copy.vision_model.to(torch.bfloat16)
        copy.language_model.to(torch.bfloat16)
        return freeze_as_stage2(copy).train()

    hf_bf16 = frozen_bf16_copy()
    # Both sides' LLM layers through the same compile: what either model gains from inductor's fused kernels.
    xllm_compiled = xllm_model(size, blip2, llm, frozen_dtype="bfloat16", compile=("llm",)).train()
    hf_compiled = frozen_bf16_copy()
    compile_layers(hf_compiled, ["language_model"])

    def xllm_loss(model):
        return lambda: model(batch).loss

    def hf_loss(model):
        return lambda: model(**inputs).loss

    return {
        "fp32": {"xllm": Trainer(xllm_fp32, xllm_loss(xllm_fp32), False), "hf": Trainer(hf, hf_loss(hf), False)},
        "bf16 autocast": {"xllm": Trainer(xllm_fp32, xllm_loss(xllm_fp32), True),
                          "hf": Trainer(hf, hf_loss(hf), True)},
        "bf16 autocast, frozen bf16": {"xllm": Trainer(xllm_bf16, xllm_loss(xllm_bf16), True),
                                       "hf": Trainer(hf_bf16, hf_loss(hf_bf16), True)},
        COMPILED: {"xllm": Trainer(xllm_compiled, xllm_loss(xllm_compiled), True),
                   "hf": Trainer(hf_compiled, hf_loss(hf_compiled), True)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", help="a subset of the settings, by name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak ({args.threads} thread(s)): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as root:
        built = build_trainers(args.size, args.batch, Path(root))
    trainers = {name: built[name] for name in args.settings} if args.settings else built
    for pair in trainers.values():
        for trainer in pair.values():
            trainer()  # warm-up: first-call allocations and kernel selection
    seconds: dict[str, dict[str, list[float]]] = {name: {"xllm": [], "hf": []} for name in trainers}
    for _ in range(args.rounds):
        for name, pair in trainers.items():
            for side, trainer in pair.items():
                seconds[name][side].append(timed(lambda: [trainer() for _ in range(args.steps)]) / args.steps)
    memory = {name: {side: (parameter_bytes(t.model), step_peak_bytes(t)) for side, t in pair.items()}
              for name, pair in trainers.items()}
    # A compiled step does the arithmetic of its eager twin, whose FLOPs are counted instead: the counter's
    # dispatch mode would only make the compiled layers recompile.
    flops = {name: {side: t.flops() for side, t in built[EAGER_TWIN.get(name, name)].items()} for name in trainers}

    print(f"\nstage-2 image step, {args.size} size, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds "
          f"of {args.steps} steps (median (range))")
    header = (f"{'setting':<28}{'model':<6}{'samples/s':>20}{'xllm / hf':>20}{'weights MiB':>13}"
              f"{'step peak MiB':>15}{'GFLOP/step':>12}{'GFLOP/s':>9}{'of peak':>9}")
    print(header)
    for name in trainers:
        ratios = speed_ratios(seconds[name]["xllm"], seconds[name]["hf"])
        peak = peaks["fp32" if name == "fp32" else "bf16"]
        for side in ("xllm", "hf"):
            rates = [args.batch / s for s in seconds[name][side]]
            achieved = flops[name][side] / statistics.median(seconds[name][side])
            weights, step = memory[name][side]
            print(f"{name:<28}{side:<6}{spread(rates):>20}{spread(ratios) if side == 'xllm' else '':>20}"
                  f"{weights / 2 ** 20:>13.0f}{step / 2 ** 20:>15.0f}{flops[name][side] / 1e9:>12.1f}"
                  f"{achieved / 1e9:>9.1f}{100 * achieved / peak:>8.0f}%")
    print("step peak: bytes allocated during one step above those allocated before it (torch profiler memory); "
          "'of peak': of the measured matmul peak in the setting's dtype")


if __name__ == "__main__":
    main()
