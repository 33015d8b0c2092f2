"""Checkpoints: trainable weights as safetensors, and what a resumed run needs beside them.

A checkpoint folder ``step_<n>/`` holds ``model.safetensors`` (only the parameters that train, by their
composite names) and ``trainer_state.pt`` (optimizer, scheduler, step, epoch, RNG). The state file holds only
tensors and plain containers, so it loads with ``weights_only=True``: no pickle code runs on load.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


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
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    skipped = sorted(k for k in state if k not in own and optional is not None and optional(k))
    if skipped:
        log.info("%s: skipped %d tensors this model does not build (e.g. %s)", file, len(skipped), skipped[0])
        for key in skipped:
            del state[key]
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in state.items() if k in own and own[k].shape != v.shape)
    if unexpected or mismatched:
        raise ValueError(f"checkpoint {file} does not fit the model: unexpected keys {unexpected[:20]}"
                         f"{' …' if len(unexpected) > 20 else ''}; shape mismatches {mismatched}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return sorted(state)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(folder: Path, model: nn.Module, trainer_state: dict, keep_last: int) -> Path:
    """Writes ``folder`` atomically (a temporary folder renamed into place) and prunes older step folders."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / WEIGHTS))
    torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    if keep_last > 0:
        for old in step_folders(folder.parent)[:-keep_last]:
            shutil.rmtree(old)
    return folder


def step_folders(checkpoints_dir: Path) -> list[Path]:
    """``step_<n>`` folders, oldest first."""
    steps = [p for p in Path(checkpoints_dir).glob("step_*") if p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def load_trainer_state(folder: str | Path) -> dict:
    file = Path(folder) / STATE
    if not file.is_file():
        raise FileNotFoundError(f"resume folder {folder} has no {STATE}")
    return torch.load(file, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    steps = step_folders(Path(run_dir) / "checkpoints")
    return steps[-1] if steps else None
