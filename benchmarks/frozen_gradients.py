"""The trainable parts' gradients through a frozen LLM stored in bf16, eager and compiled, against fp32.

    python benchmarks/frozen_gradients.py [--cfg-path configs/mini/stage2_image.yaml] [--samples 8] \\
        [--options k=v ...]

The config's model is built four ways from the same weights: frozen parts in fp32, eager (the reference);
stored in bf16 (``model.frozen_dtype: bfloat16``), eager; the same with the LLM's layers compiled
(``model.compile: [llm]``); and fp32 compiled, which should equal the reference. Each runs one training forward and
backward on the same batch, the first ``--samples`` training samples of the config's first dataset (its random
prompt drawn with a fixed seed). The table gives the loss, the norm of all trainable gradients against the
reference's, their cosine, and the range of that norm ratio over the ten largest gradient tensors. In bf16 every
op rounds its output, and backward through many frozen layers accumulates that rounding in the gradients it passes
down; the trainable parts are fp32 in every setting.
"""

from __future__ import annotations

import argparse
import random

import torch
from omegaconf import OmegaConf

from xllm.config import load_config
from xllm.datasets.build import build_split
from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.models.xllm import XLLM

SETTINGS = {"fp32": (None, []), "bf16": ("bfloat16", []), "bf16, compiled LLM": ("bfloat16", ["llm"]),
            "fp32, compiled LLM": (None, ["llm"])}
LARGEST = 10


def built(model_cfg, frozen_dtype: str | None, compile: list[str]) -> XLLM:
    cfg = OmegaConf.to_container(model_cfg)
    cfg.update(frozen_dtype=frozen_dtype, compile=compile)
    torch.manual_seed(0)  # the parts a pretrained source does not give start equal in every setting
    return build_model(resolve_model(OmegaConf.create(cfg))).train()


def gradients(model: XLLM, batch) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-path", default="configs/mini/stage2_image.yaml")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--options", nargs="*", default=[])
    args = parser.parse_args()
    cfg = load_config(args.cfg_path, args.options)
    name, dataset = next(iter(build_split(cfg.datasets, "train").items()))
    random.seed(0)
    samples = [dataset[i] for i in range(args.samples)]
    results = {}
    for setting, (frozen_dtype, compile) in SETTINGS.items():
        model = built(cfg.model, frozen_dtype, compile)
        results[setting] = gradients(model, model.collator()(samples))
        del model
    reference = results["fp32"][1]
    whole = torch.cat([g.flatten() for g in reference.values()])
    largest = sorted(reference, key=lambda n: -reference[n].norm().item())[:LARGEST]
    print(f"\n{args.cfg_path}: {args.samples} samples of {name}, trainable gradients against the fp32 model's")
    print(f"{'setting':<20} {'loss':>10} {'norm ratio':>11} {'cosine':>9}   norm ratio, {LARGEST} largest tensors")
    for setting, (loss, grads) in results.items():
        flat = torch.cat([grads[n].flatten() for n in reference])
        ratios = [(grads[n].norm() / reference[n].norm()).item() for n in largest]
        cosine = torch.nn.functional.cosine_similarity(flat, whole, dim=0).item()
        print(f"{setting:<20} {loss:>10.6f} {(flat.norm() / whole.norm()).item():>11.4f} {cosine:>9.5f}   "
              f"{min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
