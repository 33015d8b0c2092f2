"""Where xllm keeps generated data and pre-trained tiny models, where its configs live, and how a config's
paths resolve."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

# The configs ship inside the package (a checkout's top-level ``configs`` points here), so an installed xllm
# finds its model defaults and stage configs wherever it is installed.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
ZOO_PREFIX = "zoo:"


def cache_dir() -> Path:
    """``$XLLM_CACHE``, else ``~/.cache/xllm``: the synthetic world and the zoo's tiny models go here."""
    return Path(os.environ.get("XLLM_CACHE") or Path.home() / ".cache" / "xllm").expanduser()


def configs_dir() -> Path:
    return CONFIGS_DIR


def resolve_path(spec: str | Path) -> Path:
    """Every path a config holds, one rule: ``zoo:<tier>/<name>`` points into the zoo cache, ``~`` is the home
    folder, and a relative path is relative to the working directory."""
    spec = str(spec)
    if spec.startswith(ZOO_PREFIX):
        return cache_dir() / "zoo" / spec[len(ZOO_PREFIX):]
    return Path(spec).expanduser()


def zoo_hint(spec: str | Path) -> str:
    """What a missing ``zoo:`` path's error adds: how to build the zoo."""
    return " (build the zoo: python -m xllm.zoo build tiny)" if str(spec).startswith(ZOO_PREFIX) else ""


def find_config(path: str | Path) -> Path:
    """A config file by its path, or else by its path inside the packaged configs (``tiny/stage2_image.yaml``)."""
    given = resolve_path(path)
    if given.is_file() or given.is_absolute():
        return given
    packaged = CONFIGS_DIR / given
    return packaged if packaged.is_file() else given


def spec_digest(spec) -> str:
    """A short name for a dataclass spec: the cache folder of what it generates."""
    return hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]


def is_current(marker: Path, spec) -> bool:
    """Whether a folder's ``marker`` file records exactly ``spec``: what the spec generates is there and complete
    (the marker is written last)."""
    return marker.is_file() and json.loads(marker.read_text()) == asdict(spec)


def mark_current(marker: Path, spec) -> None:
    marker.write_text(json.dumps(asdict(spec)))


def looks_local(spec: str) -> bool:
    """Whether a model path names a folder on this machine rather than a Hub id (``org/name``): absolute,
    relative with ``.`` or ``~``, ``zoo:``, or more than one ``/``."""
    return spec.startswith(("/", ".", "~", ZOO_PREFIX)) or spec.count("/") > 1 or "\\" in spec


def check_readable(spec: str, kind: str, key: str) -> None:
    """The ``kind`` of thing config key ``key`` names (``xllm.common.config.PATH_KINDS``) exists and can be read;
    ``zoo:`` paths are left to the zoo, which builds them, and a ``model`` that is not on disk and does not look
    local is a Hub id."""
    if spec.startswith(ZOO_PREFIX):
        return
    path = resolve_path(spec)
    if kind == "model" and not path.exists() and not looks_local(spec):
        return
    if not path.exists():
        hint = " (a path, not a Hub id)" if kind == "model" else ""
        raise FileNotFoundError(f"config key '{key}': {path} does not exist{hint}")
    if kind in ("folder", "model") and not path.is_dir():
        raise NotADirectoryError(f"config key '{key}': {path} is not a folder")
    if kind == "file" and not path.is_file():
        raise IsADirectoryError(f"config key '{key}': {path} is not a file")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PermissionError(f"config key '{key}': {path} cannot be read")


def ensure_writable(folder: str | Path, key: str) -> Path:
    """``folder`` created if needed and proven writable (a probe file written and removed), before any work;
    an error naming the config ``key`` otherwise."""
    folder = resolve_path(folder)
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"{key}: cannot write to {folder} ({error.strerror or error}); choose another "
                              "folder or free this one") from None
    return folder


def read_utf8(path: Path) -> str:
    """A text file's content; one that is not UTF-8 is an error naming it and the first bad byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); annotation and text files "
                         "must be UTF-8") from None
