"""Weights in and out: the one reader of weight files, the one key- and shape-checking loader, and checkpoints.

Every format xllm reads (its own checkpoints, Hugging Face and ChatGLM folders with sharded safetensors or
``.bin`` files, converted LAVIS / BLIP-2 / Whisper weights) goes through ``read_weights`` and ``load_state``, so a
checkpoint that does not fit its model is always one error naming the source, the files and every bad key.

A run's checkpoint folder ``step_<n>/`` holds ``model.safetensors`` (only the parameters that train, by their
composite names, whole whatever the sharding), the optimizer state (``xllm.runners.parallel``) and
``trainer_state.pt`` with one ``rng_<rank>.pt`` per process (``xllm.runners.runner``); it is written in a
staging folder and published by an atomic rename.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
# Marks a part's folder that holds its config and tokenizer but not its weights: a shared model folder bundles its
# frozen parts so (``xllm.models.share``, ``include_frozen``) and fills them from its own weights file, so the
# loaders build such a part from its config alone.
WEIGHTS_ELSEWHERE = "xllm_weights_elsewhere.json"
# A folder's weights, in order of preference: a shard index, else the single file it would index.
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


class CheckpointError(ValueError):
    """Weights that do not fit their model: the message lists every problem, naming files and keys."""


@dataclass
class Weights:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # the file each key came from
    skipped: list[str] = field(default_factory=list)  # keys ``skip`` accepted, never read
    problems: list[str] = field(default_factory=list)  # missing shards, keys in two files


def _index_files(folder: Path, index: Path, skip: Callable[[str], bool] | None, weights: Weights) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index}: not a weight index ({error!r})") from None
    needed = set()
    for key, name in weight_map.items():
        if skip is not None and skip(key):
            weights.skipped.append(key)  # a shard holding only skipped keys is never opened
        else:
            needed.add(name)
    weights.problems += [f"missing shard file {name}" for name in sorted(needed) if not (folder / name).is_file()]
    return [folder / name for name in sorted(needed) if (folder / name).is_file()]


def read_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A pickled dict of tensors (``.bin``), read with ``weights_only``: no code runs."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in torch's legacy (non-zip) format cannot be memory-mapped
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path} holds a {type(tensors).__name__}, not a dict of tensors")
    return tensors


def read_weights(path: str | Path, skip: Callable[[str], bool] | None = None) -> Weights:
    """Every tensor of a weight file or of a checkpoint folder (a shard index or a single file, safetensors or
    ``.bin``); keys ``skip`` accepts (an LLM inside a multimodal checkpoint) are listed, not read."""
    path = Path(path)
    weights = Weights()
    if path.is_file():
        files = [path]
    else:
        for index_name, single_name in WEIGHT_LAYOUTS:
            if (path / index_name).is_file():
                files = _index_files(path, path / index_name, skip, weights)
                break
            if (path / single_name).is_file():
                files = [path / single_name]
                break
        else:
            names = ", ".join(name for pair in WEIGHT_LAYOUTS for name in pair)
            raise FileNotFoundError(f"{path} holds no weights (looked for {names})")
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as opened:
                    keys = list(opened.keys())
                    read = {k: opened.get_tensor(k) for k in keys if skip is None or not skip(k)}
            except SafetensorError as error:  # its own message names no file
                raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
        else:
            read = read_pickled_tensors(file)
            keys = list(read)
        for key in keys:
            if key in weights.origin:
                weights.problems.append(f"key {key} is in both {weights.origin[key]} and {file.name}")
            elif key not in read:
                weights.skipped.append(key)
            else:
                weights.tensors[key], weights.origin[key] = read[key], file.name
    return weights


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tensor under its first name only: safetensors refuses a tensor stored twice, and a state
    dict names tied weights (an LLM's output layer and embeddings) and modules one part shares with another (the
    video modality's image encoder) once per owner. State dicts list a module's owner first."""
    seen, unique = set(), {}
    for name, tensor in state.items():
        place = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
                 tensor.stride(), tensor.dtype)
        if tensor.numel() and place in seen:
            continue
        seen.add(place)
        unique[name] = tensor
    return unique


def weights_elsewhere(folder: str | Path) -> bool:
    """Whether ``folder`` is a part whose weights another file holds (see ``WEIGHTS_ELSEWHERE``)."""
    return (Path(folder) / WEIGHTS_ELSEWHERE).is_file()


def check_state(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                missing_ok: bool | Callable[[str], bool] = False, unexpected_ok: bool = False,
                origin: Mapping[str, str] | None = None, problems: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Whether ``state`` fits ``module``'s parameters and buffers by name and shape; returns (missing,
    unexpected) keys. Wrong shapes, unexpected keys (unless ``unexpected_ok``), missing keys (unless
    ``missing_ok`` says so for them) and the reader's ``problems`` are one ``CheckpointError`` naming ``source``
    and every key."""
    own = dict(module.state_dict())
    where = {key: f" in {origin[key]}" for key in state if origin and key in origin}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    found = list(problems)
    found += [f"{k}{where.get(k, '')} has shape {list(v.shape)}, the model needs {list(own[k].shape)}"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if not unexpected_ok:
        found += [f"unexpected key {k}{where.get(k, '')}" for k in unexpected]
    if missing_ok is not True:
        found += [f"missing key {k}" for k in missing if not (callable(missing_ok) and missing_ok(k))]
    if found:
        listing = "\n".join(f"  - {p}" for p in found)
        raise CheckpointError(f"{source}: the weights do not fit {type(module).__name__} ({len(found)} "
                              f"problem{'s' if len(found) > 1 else ''}):\n{listing}")
    return missing, unexpected


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, assign: bool = False,
               **checks) -> tuple[list[str], list[str]]:
    """Copies ``state`` into ``module`` by name after ``check_state(**checks)``; returns (missing, unexpected).
    ``assign`` puts the tensors themselves in place (a model built on the meta device)."""
    missing, unexpected = check_state(module, state, source, **checks)
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False, assign=assign)
    return missing, unexpected


def weights_path(path: str | Path) -> Path:
    """A safetensors file, the weights inside a checkpoint folder, or those of a run folder's latest checkpoint."""
    path = Path(path).expanduser()
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"run folder {path} holds no checkpoint yet")
        path = latest
    return path / WEIGHTS if path.is_dir() else path


def load_weights(model: nn.Module, path: str | Path, optional: Callable[[str], bool] | None = None) -> list[str]:
    """Loads a (partial) checkpoint into ``model``; every key in the file must exist there with the same shape.

    Returns the loaded names. A checkpoint holds only what trained, so model keys absent from it are expected;
    keys in the file that the model lacks are not, and are reported rather than ignored, except those
    ``optional(key)`` accepts: parts an earlier stage trained that this model does not build (the Q-Former's
    stage-1 text branch), which are skipped and counted in the log.
    """
    file = weights_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {file}")
    state = load_file(str(file))
    bad = [key for key, tensor in state.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"checkpoint {file}: {len(bad)} tensors hold NaN or infinite values "
                              f"({', '.join(bad[:5])}): it came from a run that diverged")
    own = model.state_dict()
    skipped = sorted(k for k in state if k not in own and optional is not None and optional(k))
    if skipped:
        log.info("%s: skipped %d tensors this model does not build (e.g. %s)", file, len(skipped), skipped[0])
        for key in skipped:
            del state[key]
    load_state(model, state, f"checkpoint {file}", missing_ok=True)
    return sorted(state)


def library_version() -> str:
    """The installed xllm's version, which checkpoint manifests and shared model folders record."""
    try:
        return importlib.metadata.version("xllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def staging_folder(folder: Path) -> Path:
    """Where ``folder`` is written before ``publish`` renames it into place."""
    return folder.with_name(folder.name + ".tmp")


def publish(folder: Path, keep_last: int, keep: Callable[[list[Path]], Path | None] | None = None) -> Path:
    """Moves the staged ``folder`` into place atomically, its files flushed to disk first, and prunes older step
    folders beyond ``keep_last``, except the one ``keep`` picks among them all (the best): a kill at any moment
    leaves the previous checkpoint whole."""
    tmp = staging_folder(folder)
    for file in tmp.rglob("*"):
        if file.is_file():
            with file.open("rb+") as handle:
                os.fsync(handle.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    directory = os.open(folder.parent, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    if keep_last > 0:
        folders = step_folders(folder.parent)
        kept = keep(folders) if keep is not None else None
        for old in folders[:-keep_last]:
            if old != kept:
                shutil.rmtree(old)
    return folder


def step_folders(checkpoints_dir: Path) -> list[Path]:
    """``step_<n>`` folders, oldest first."""
    steps = [p for p in Path(checkpoints_dir).glob("step_*") if p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    steps = step_folders(Path(run_dir) / "checkpoints")
    return steps[-1] if steps else None
