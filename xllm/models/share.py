"""A trained model as a folder that others load: ``XLLM.save_pretrained(DIR)`` and ``XLLM.from_pretrained(DIR)``.

The folder holds ``xllm_config.json`` (the resolved model config), ``model.safetensors`` and a ``README.md`` model
card. By default the weights file holds what the frozen sources do not give: every weight that trained or that a
checkpoint loaded (interfaces, adapters, LoRA adapters, an LLM's merged layers), and the config names each frozen
part as it was given (a Hub id, a ``zoo:`` name, an absolute path; a relative path made absolute), so loading
fetches them as training did. With ``include_frozen`` the file holds every weight and ``frozen/`` the frozen parts'
configs and tokenizers without their weights, so the folder loads where none of the sources is: those parts are
built from their configs (``WEIGHTS_ELSEWHERE``) and then filled from the file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from xllm.common.checkpoint import (WEIGHTS, WEIGHTS_ELSEWHERE, library_version, load_state, publish, read_weights,
                                    staging_folder, unique_tensors)
from xllm.common.dtypes import torch_dtype
from xllm.common.paths import ZOO_PREFIX, looks_local
from xllm.models.config import LLMConfig, ModelConfig, component_blocks, resolve_model
from xllm.models.lora import lora_layers
from xllm.models.pretrained import LN_VISION
from xllm.models.registry import ARCHS
from xllm.models.sources import MANIFEST as SOURCE_MANIFEST
from xllm.models.sources import model_folder
from xllm.models.trainable import matches

CONFIG = "xllm_config.json"
CARD = "README.md"
FORMAT = 1  # the layout of CONFIG; a reader refuses another
BUNDLED = "frozen"  # with include_frozen: the frozen parts' files but their weights
# Weight files in any format a frozen part's folder may hold beside its config and tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz",
                   ".index.json")
CARD_KEYS = ("title", "description", "stages", "datasets", "figures", "tags")


def is_model_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / CONFIG).is_file()


# ----------------------------------------------------------------- writing


def save_pretrained(model: nn.Module, folder: str | Path, include_frozen: bool = False,
                    card: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` (as ``build_model`` made it) into ``folder`` as the module's docstring says, through a
    staging folder renamed into place; returns ``folder``. ``card`` holds what the model card tells beyond the
    config (``CARD_KEYS``: a title, a description, the stages, datasets and figures)."""
    if not isinstance(getattr(model, "config", None), DictConfig) or not hasattr(model, "source_keys"):
        raise ValueError("save_pretrained needs a model built from a config (build_model, load_model, "
                         "XLLM.from_pretrained): the folder records that config")
    card = dict(card or {})
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"card keys {unknown} are unknown; a card holds {', '.join(CARD_KEYS)}")
    folder = Path(folder).expanduser().absolute()
    # ``publish`` replaces the folder: only an earlier shared model may be replaced, never someone's other files.
    if folder.exists() and not is_model_folder(folder) and (folder.is_file() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an xllm model folder: it is not replaced")
    staging = staging_folder(folder)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        state = unique_tensors(model.state_dict())
        if not include_frozen:
            state = {key: tensor for key, tensor in state.items() if key not in model.source_keys}
        save_file({key: tensor.detach().cpu().contiguous() for key, tensor in state.items()},
                  str(staging / WEIGHTS), metadata={"format": "pt"})
        config, bundled = shared_config(model, include_frozen, staging)
        record = {"format": FORMAT, "xllm_version": library_version(), "include_frozen": include_frozen,
                  "bundled": bundled, "model": config, "card": card}
        (staging / CONFIG).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        sources = {key: _portable_value(block[name]) for block, name, key in path_fields(model.config)
                   if key != "model.checkpoint"}
        (staging / CARD).write_text(model_card(config, card, sources, include_frozen, len(state)), encoding="utf-8")
    except BaseException:  # a half-written folder is never left to be taken for a model
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish(folder, keep_last=0)


def shared_config(model: nn.Module, include_frozen: bool, staging: Path) -> tuple[dict, dict[str, str]]:
    """The model's config as the folder records it, and the config keys of the frozen parts it bundles with their
    paths inside the folder."""
    cfg = OmegaConf.create(OmegaConf.to_container(model.config))
    cfg.checkpoint = None  # the weights file holds what the checkpoints gave
    if cfg.llm.lora is not None and not lora_layers(model):  # merged: the file holds the LLM's changed layers
        cfg.llm.lora = None
    # A pattern that names no parameter fails the build: the LoRA adapters' once they are merged.
    names = [name for name, _ in model.named_parameters()]
    cfg.trainable = [pattern for pattern in cfg.trainable if any(matches(name, [pattern]) for name in names)]
    bundled = {}
    if include_frozen:
        if cfg.llm.gguf_file:
            raise ValueError(f"include_frozen cannot bundle a GGUF LLM (model.llm.gguf_file={cfg.llm.gguf_file!r}): "
                             "its config and tokenizer live inside the GGUF file; name a transformers folder instead")
        if cfg.pretrained and "ln_vision_eps" in cfg.modalities.get("image", {}).get("encoder", {}):
            # The original checkpoints imply this eps, and the folder no longer reads them.
            cfg.modalities.image.encoder.ln_vision_eps = model.get_submodule(LN_VISION).eps
        cfg.pretrained = []
    for block, name, key in path_fields(cfg):
        value = block[name]
        if include_frozen:
            block[name] = bundled[key] = bundle(value, key, staging)
        else:
            block[name] = _portable_value(value)
    return OmegaConf.to_container(cfg), bundled


def path_fields(cfg: DictConfig) -> Iterator[tuple[DictConfig, str, str]]:
    """(block, field name, config key) of every path a model config sets."""
    blocks = [(ModelConfig, cfg, "model"), (LLMConfig, cfg.llm, "model.llm"), *component_blocks(cfg)]
    for schema, block, where in blocks:
        for spec in fields(schema):
            if spec.metadata.get("path") and block.get(spec.name):
                yield block, spec.name, f"{where}.{spec.name}"


def portable(spec: str) -> str:
    """``spec`` as any working directory reads it: a relative path on this machine made absolute; a Hub id, a
    ``zoo:`` name, ``~`` or an absolute path kept as given, never the cache folder a source resolved to."""
    if spec.startswith((ZOO_PREFIX, "~")) or Path(spec).is_absolute() or not Path(spec).exists():
        return spec
    return str(Path(spec).resolve())


def _portable_value(value: str | ListConfig) -> str | list[str]:
    return [portable(v) for v in value] if isinstance(value, ListConfig) else portable(value)


def bundle(spec: str, key: str, staging: Path) -> str:
    """Copies the files of the frozen part config key ``key`` names, but its weights, into the staging folder;
    returns their path inside the folder."""
    source = model_folder(spec, key)
    inside = f"{BUNDLED}/{key.removeprefix('model.').removeprefix('modalities.')}"
    target = staging / inside
    target.mkdir(parents=True)
    held_weights = False
    # Top-level files only: configs and tokenizers sit there, a snapshot's subfolders hold other formats.
    for file in sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")):
        # Code never travels (nothing here runs a model's own code); the manifest lists files left behind.
        if file.suffix == ".py" or file.name == SOURCE_MANIFEST:
            continue
        if file.name.endswith(WEIGHT_SUFFIXES):
            held_weights = True
        else:
            shutil.copy2(file, target / file.name)
    if held_weights:
        (target / WEIGHTS_ELSEWHERE).write_text(json.dumps({"weights": f"../../{WEIGHTS}"}) + "\n")
    return inside


# ----------------------------------------------------------------- reading


def from_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None, **overrides: Any) -> nn.Module:
    """The model a shared folder holds (a folder, a ``zoo:`` path, or a Hub id resolved as ``model_folder`` does),
    in eval mode on ``device``, every floating-point weight cast to ``dtype`` (``torch.bfloat16``, ``"bfloat16"``)
    if given. ``overrides`` replace keys of its model config (``llm={"max_prompt_length": 256}``). The weights file
    must hold every weight the config does not take from the frozen sources, with the shapes the config gives: an
    error names the file and each key."""
    folder = model_folder(str(name_or_path), "XLLM.from_pretrained")
    saved = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: the weights file {WEIGHTS} is missing")
    cfg = OmegaConf.create(saved["model"])
    for key, inside in saved.get("bundled", {}).items():
        OmegaConf.update(cfg, key.removeprefix("model."), str(folder / inside))
    cfg = resolve_model(OmegaConf.merge(cfg, overrides))
    model = ARCHS.get(cfg.arch)(cfg)
    read = read_weights(weights)
    wanted = set(unique_tensors(model.state_dict()))
    if not saved.get("include_frozen"):
        wanted -= model.source_keys
    load_state(model, read.tensors, str(weights), missing_ok=lambda key: key not in wanted, origin=read.origin)
    model.source_keys = model.source_keys - set(read.tensors)  # saved again, the folder's weights go with it
    if dtype is not None:
        model.to(torch_dtype(dtype))
    return model.to(device).eval()


def read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not an xllm model folder: it has no {CONFIG} "
                                "(XLLM.save_pretrained writes one)")
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not readable JSON ({error})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("model"), dict):
        found = saved.get("format") if isinstance(saved, dict) else None
        raise ValueError(f"{file} is not an xllm model config of format {FORMAT} (format {found!r}): written by "
                         "another xllm, or not by XLLM.save_pretrained")
    return saved


# ----------------------------------------------------------------- the model card


def model_card(config: dict, card: dict[str, Any], sources: dict[str, Any], include_frozen: bool,
               tensors: int) -> str:
    """``README.md``: Hugging Face model-card front matter (library, tags, base models), then the parts, the
    frozen sources, and the card's stages, datasets and figures."""
    modalities = config["modalities"]
    llm = config["llm"]
    tags = ["xllm", "multimodal", *modalities]
    if llm["backend"] != "none":
        tags.append(llm["backend"])
    if llm["lora"] is not None:
        tags.append("lora")
    tags += [tag for tag in card.get("tags", []) if tag not in tags]
    frozen = [v for value in sources.values() for v in (value if isinstance(value, list) else [value])]
    hub = [v for v in frozen if not looks_local(v) and not Path(v).exists()]
    meta = {"library_name": "xllm", "tags": tags, **({"base_model": hub} if hub else {})}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {card.get('title', 'An X-LLM model')}", ""]
    if card.get("description"):
        lines += [card["description"], ""]
    lines += ["Frozen encoders, trained interfaces and adapters, and a frozen LLM that reads the media as words "
              "(X-LLM, Chen et al. 2023), saved by xllm. Load it with:", "",
              "```python", "from xllm.models import load_model_and_preprocess", "",
              'model, processors, _ = load_model_and_preprocess("path/to/this/folder")', "```", "",
              "## Parts", "", "| modality | encoder | interface | adapter |", "|---|---|---|---|"]
    lines += [f"| {name} | {parts['encoder']['name']} | {parts['interface']['name']} | {parts['adapter']['name']} |"
              for name, parts in modalities.items()]
    lines.append("")
    if llm["backend"] != "none":
        lora = llm["lora"]
        adapted = "" if lora is None else f" with LoRA (r={lora['r']}) on {_cell(lora['target_modules'])}"
        lines.append(f"- LLM: the `{llm['backend']}` backend{adapted}.")
    lines.append(f"- Trainable as the last stage left it: {_cell(config['trainable']) or 'nothing'}.")
    if sources:
        lines += ["", "## Frozen parts", "", "| config key | source |", "|---|---|"]
        lines += [f"| {key} | `{_cell(value)}` |" for key, value in sources.items()]
    lines += ["", f"`model.safetensors` holds {tensors} tensors: "
              + ("every weight; `frozen/` holds the frozen parts' configs and tokenizers, so the folder needs none of "
                 "the sources above." if include_frozen else
                 "the weights that trained or that checkpoints gave; the frozen parts load from the sources above.")]
    stages = [stage if isinstance(stage, dict) else {"stage": stage} for stage in card.get("stages") or []]
    if stages:
        columns = list(dict.fromkeys(key for stage in stages for key in stage))
        lines += ["", "## Training stages", "", _row(columns), _row(["---"] * len(columns))]
        lines += [_row([_cell(stage.get(column, "")) for column in columns]) for stage in stages]
    datasets = card.get("datasets") or {}
    if datasets:
        lines += ["", "## Datasets", ""]
        entries = datasets.items() if isinstance(datasets, dict) else ((d, "") for d in datasets)
        lines += [f"- **{name}**" + (f": {_cell(about)}" if about else "") for name, about in entries]
    figures = card.get("figures") or {}
    if figures:
        lines += ["", "## Evaluation", "", "| figure | value |", "|---|---|"]
        lines += [_row([name, _cell(value)]) for name, value in _flatten(figures).items()]
    return "\n".join(lines) + "\n"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key} / ").items()}
    return {prefix[:-3]: tree}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
