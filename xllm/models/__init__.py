"""Models: encoders, X2L interfaces, adapters, LLM backends and the composite; the notebook entry points."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from xllm.models.xllm import XLLM


def load_model(name: str = "xllm", model_type: str = "tiny", is_eval: bool = True, device: str = "cpu",
               checkpoint: str | Path | None = None, **overrides) -> XLLM:
    """The model ``configs/models/{name}/{model_type}.yaml`` describes, with trained weights from ``checkpoint``.

    ``overrides`` replace model config keys (``load_model(..., llm={"dtype": "bfloat16"})``).
    """
    from xllm.common.config import resolve_model

    spec = {"arch": name, "model_type": model_type, **overrides}
    if checkpoint is not None:
        spec["checkpoint"] = str(checkpoint)
    from xllm.models.builder import build_model

    model = build_model(resolve_model(OmegaConf.create(spec))).to(torch.device(device))
    return model.eval() if is_eval else model


def load_model_and_preprocess(name: str = "xllm", model_type: str = "tiny", is_eval: bool = True,
                              device: str = "cpu", checkpoint: str | Path | None = None, **overrides):
    """``(model, vis_processors, txt_processors)``; processors are dicts with ``"train"`` and ``"eval"`` entries."""
    from xllm.processors.image import ImageProcessor
    from xllm.processors.text import TextProcessor

    model = load_model(name, model_type, is_eval, device, checkpoint, **overrides)
    vis = {}
    if "image" in model.encoders:
        processor = ImageProcessor(model.encoders["image"].image_size)
        vis = {"train": processor, "eval": processor}
    text = TextProcessor()
    return model, vis, {"train": text, "eval": text}


__all__ = ["XLLM", "load_model", "load_model_and_preprocess"]
