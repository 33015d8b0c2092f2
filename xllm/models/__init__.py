"""Models: encoders, X2L interfaces, adapters, LLM backends, objectives and the composite; the notebook entry points.

Importing the package registers every model component (each module registers what it defines) and the builder of
each arch.
"""

from __future__ import annotations

from pathlib import Path

from xllm.models import adapters, builder, encoders, interfaces, llm, objectives  # noqa: F401  (registration)
from xllm.models.config import resolve_model
from xllm.models.share import is_model_folder
from xllm.models.xllm import XLLM


def load_model(name: str | Path = "xllm", model_type: str = "tiny", is_eval: bool = True, device: str = "cpu",
               checkpoint: str | Path | None = None, **overrides) -> XLLM:
    """The model ``configs/models/{name}/{model_type}.yaml`` describes, with trained weights from ``checkpoint``;
    or, as transformers' ``from_pretrained`` takes a name or a path, the model of a folder ``XLLM.save_pretrained``
    wrote when ``name`` is a path (``load_model("path/to/folder")``; ``model_type`` is then the folder's).

    ``overrides`` replace model config keys (``load_model(..., llm={"dtype": "bfloat16"})``).
    """
    if names_a_folder(name):
        if checkpoint is not None:
            raise ValueError(f"checkpoint={checkpoint!r} with the model folder {name}: the folder holds its trained "
                             "weights (load a later stage's with its own folder or its run's config)")
        model = XLLM.from_pretrained(name, device=device, **overrides)
    else:
        spec = {"arch": name, "model_type": model_type, **overrides}
        if checkpoint is not None:
            spec["checkpoint"] = str(checkpoint)
        model = builder.build_model(resolve_model(spec)).to(device)
    return model.eval() if is_eval else model.train()


def names_a_folder(name: str | Path) -> bool:
    """Whether ``load_model``'s ``name`` is a model folder rather than an arch: arch names hold no ``/``."""
    return isinstance(name, Path) or "/" in name or "\\" in name or is_model_folder(name)


def load_model_and_preprocess(name: str | Path = "xllm", model_type: str = "tiny", is_eval: bool = True,
                              device: str = "cpu", checkpoint: str | Path | None = None, **overrides):
    """``(model, processors, text_processors)``: ``processors[modality]`` and ``text_processors`` are dicts with
    ``"train"`` and ``"eval"`` entries; every modality whose config names a processor has one. ``name`` may be a
    model folder, as in ``load_model``."""
    from xllm.processors.text import TextProcessor

    model = load_model(name, model_type, is_eval, device, checkpoint, **overrides)
    processors = {modality: {"train": p, "eval": p} for modality, p in builder.build_processors(model.config).items()}
    text = TextProcessor()
    return model, processors, {"train": text, "eval": text}


__all__ = ["XLLM", "load_model", "load_model_and_preprocess"]
