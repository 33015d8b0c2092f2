"""Where xllm keeps generated data and pre-trained tiny models, and where its configs live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """``$XLLM_CACHE``, else ``~/.cache/xllm``: the synthetic world and the zoo's tiny models go here."""
    return Path(os.environ.get("XLLM_CACHE") or Path.home() / ".cache" / "xllm").expanduser()


def configs_dir() -> Path:
    path = REPO_ROOT / "configs"
    if not path.is_dir():
        raise FileNotFoundError(f"xllm's configs folder is missing at {path}: install xllm from a checkout (pip install -e .)")
    return path


ZOO_PREFIX = "zoo:"


def resolve_path(spec: str) -> Path:
    """A path from a config: ``zoo:<tier>/<name>`` points into the zoo cache, anything else is a filesystem path."""
    if spec.startswith(ZOO_PREFIX):
        return cache_dir() / "zoo" / spec[len(ZOO_PREFIX):]
    return Path(spec).expanduser()
