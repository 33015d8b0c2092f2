"""Models: encoders, X2L interfaces, adapters, LLM backends, objectives and the composite; the notebook entry points.

Importing the package registers every model component (each module registers what it defines).
"""

from __future__ import annotations

from pathlib import Path

from xllm.models import adapters, encoders, interfaces, llm, objectives  # noqa: F401  (registration)
from xllm.models.xllm import XLLM


def load_model(name: str = "xllm", model_type: str = "tiny", is_eval: bool = True, device: str = "cpu",
               checkpoint: str | Path | None = None, **overrides) -> XLLM:
    """The model ``configs/models/{name}/{model_type}.yaml`` describes, with trained weights from ``checkpoint``.

    ``overrides`` replace model config keys (``load_model(..., llm={"dtype": "bfloat16"})``).
    """
    from xllm.models.builder import build_model
    from xllm.models.config import resolve_model

    spec = {"arch": name, "model_type": model_type, **overrides}
    if checkpoint is not None:
        spec["checkpoint"] = str(checkpoint)
    model = build_model(resolve_model(spec)).to(device)
    return model.eval() if is_eval else model.train()


def load_model_and_preprocess(name: str = "xllm", model_type: str = "tiny", is_eval: bool = True,
                              device: str = "cpu", checkpoint: str | Path | None = None, **overrides):
    """``(model, processors, text_processors)``: ``processors[modality]`` and ``text_processors`` are dicts with
    ``"train"`` and ``"eval"`` entries; every modality whose config names a processor has one."""
    from xllm.models.builder import build_processors
    from xllm.processors.text import TextProcessor

    model = load_model(name, model_type, is_eval, device, checkpoint, **overrides)
    processors = {modality: {"train": p, "eval": p} for modality, p in build_processors(model.config).items()}
    text = TextProcessor()
    return model, processors, {"train": text, "eval": text}


__all__ = ["XLLM", "load_model", "load_model_and_preprocess"]
