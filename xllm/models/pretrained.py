"""Original checkpoints named by a model config (``model.pretrained``), converted and loaded at build time.

One original file holds several of the composite's modules at once (a LAVIS stage-2 file: ``ln_vision``, the
Q-Former and ``opt_proj``; an X-LLM merged file: image, video and speech parts), so the files are listed for the
whole model, in order, later ones winning (X-LLM's own merge order). The format follows from the path:

- a ``.pth`` file: LAVIS (``eva_vit_g.pth``, ``blip2_pretrained*.pth``) or X-LLM runner checkpoints;
- a folder, ``.safetensors`` or ``.bin`` file: a Hugging Face ``Blip2*`` checkpoint.

Keys a file converts to that the model lacks are an error naming them; model keys no file fills are reported
(an encoder-only ``eva_vit_g.pth`` leaves the Q-Former to another file), never ignored silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from xllm.common.paths import resolve_path
from xllm.models.converters.blip2 import (
    IMAGE_ENCODER,
    LoadReport,
    load_hf_blip2,
    load_into,
    load_xllm_checkpoint,
    merge_loaded,
)

log = logging.getLogger(__name__)

LN_VISION = IMAGE_ENCODER + "post_layernorm"


def convert(path: str, target_keys: list[str], image_size: int | None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    file = resolve_path(path)
    if not file.exists():
        raise FileNotFoundError(f"model.pretrained: {file} does not exist")
    if file.is_file() and file.suffix == ".pth":
        # The X-LLM reader is LAVIS's plus X-LLM's own keys, so it reads both families of .pth files.
        return load_xllm_checkpoint(file, image_size=image_size, target_keys=target_keys)
    if file.is_dir() or file.suffix in (".safetensors", ".bin"):
        return load_hf_blip2(file, image_size=image_size, target_keys=target_keys)
    raise ValueError(f"model.pretrained: {file} is neither a .pth file (LAVIS, X-LLM) nor a Hugging Face "
                     "checkpoint (a folder, .safetensors or .bin)")


def missing_summary(missing: Iterable[str]) -> str:
    """Missing keys counted per module (``interfaces.image: 12``): a full list would run to hundreds of lines."""
    counts = Counter(".".join(key.split(".")[:2]) for key in missing)
    return ", ".join(f"{module}: {n}" for module, n in sorted(counts.items())) or "none"


def load_pretrained(model: nn.Module, paths: list[str], ln_vision_eps: float | None = None) -> LoadReport:
    """Converts ``paths`` into ``model`` (an ``XLLM``); returns the merged report.

    ``ln_vision_eps`` set in the config wins; otherwise the eps the files imply (LAVIS 1e-5, Hugging Face the
    config's) is given to the image encoder's ``post_layernorm``, BLIP-2's ``ln_vision``.
    """
    target = list(model.state_dict())
    image_size = getattr(model.encoders["image"], "image_size", None) if "image" in model.encoders else None
    state, report = merge_loaded(*(convert(p, target, image_size) for p in paths), target_keys=target)
    if report.unexpected:
        raise ValueError(f"model.pretrained {paths}: keys the model has no place for: {report.unexpected}\n{report}")
    load_into(model, state, strict=False)  # every converted key has a place (checked above); shapes are checked there
    if report.ln_vision_eps is not None and LN_VISION + ".weight" in state:
        norm = model.get_submodule(LN_VISION)
        if ln_vision_eps is None:
            norm.eps = report.ln_vision_eps
        elif ln_vision_eps != report.ln_vision_eps:
            log.warning("image encoder ln_vision_eps %g (config) differs from the %g the pretrained files imply",
                        ln_vision_eps, report.ln_vision_eps)
    log.info("%s\n  missing per module: %s", report, missing_summary(report.missing or []))
    return report
