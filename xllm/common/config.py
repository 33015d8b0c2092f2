"""Configuration: OmegaConf YAML with ``model``, ``datasets`` and ``run`` sections, checked against dataclasses.

Every section is validated before anything is built: an unknown key is an error naming its full path and the
closest known key, a value of the wrong type is an error naming its full path. Model defaults come from
``configs/models/{arch}/{model_type}.yaml`` and the run's file overrides them; ``--options a.b=c`` overrides
both. The schemas of pluggable components (one interface's options, one builder's options) are the ``Config``
dataclasses of the registered classes, so a component owns its options and the checker still sees them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xllm.common.paths import configs_dir


class ConfigError(ValueError):
    """A configuration problem, always naming the file or the key."""


# --------------------------------------------------------------------------- schemas


@dataclass
class LLMConfig:
    backend: str = "hf_causal"  # a registered LLM backend, or "none": no LLM (stage 1 trains without one)
    path: str = ""  # a folder, "zoo:<tier>/<name>", or a hub name when the hub is reachable
    dtype: str = "float32"
    gguf_file: str | None = None  # GGUF weights inside ``path`` (the mini tier's LLM ships that way)
    max_prompt_length: int | None = None
    overflow: str = "refuse"  # what a longer prompt gets: "refuse" (error) or "truncate" (keep its end, warn)
    gradient_checkpointing: bool = False


@dataclass
class ModalityConfig:
    encoder: dict[str, Any] = field(default_factory=dict)  # {"name": <registered encoder>, ...its Config}
    interface: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=lambda: {"name": "linear"})
    shares: str | None = None  # another modality whose encoder and interface modules this one's build reuses


@dataclass
class ModelConfig:
    arch: str = "xllm"
    model_type: str = "tiny"
    llm: LLMConfig = field(default_factory=LLMConfig)
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)  # module names or globs; everything else is frozen
    # Original checkpoints converted at build time, before ``checkpoint``: LAVIS/X-LLM ``.pth`` files, Hugging
    # Face ``Blip2*`` folders (``xllm.models.pretrained``); later ones win.
    pretrained: list[str] = field(default_factory=list)
    # Trained interfaces/adapters: a safetensors file or a run's checkpoint folder, or a list of them loaded in
    # order (later ones win), e.g. the stage-2 run of each modality. ``Any``: OmegaConf has no ``str | list``.
    checkpoint: Any = None


@dataclass
class RunConfig:
    task: str = "image_text"
    output_dir: str = "outputs/run"
    seed: int = 42
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    amp: str | None = None  # "bf16" or "fp16" autocast; None for full precision
    max_epochs: int = 1
    max_steps: int | None = None  # stops early when set
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0
    num_workers: int = 0
    log_interval: int = 10
    val_interval: int | None = None  # optimizer steps between validations; None: once per epoch
    val_max_batches: int | None = None
    save_interval: int | None = None  # optimizer steps between checkpoints; None: once per epoch
    keep_last: int = 2
    resume: str | None = None
    max_new_tokens: int = 40
    num_beams: int = 1
    eval_split: str = "test"
    eval_max_samples: int | None = None
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    distributed: str = "ddp"  # strategy when launched with torchrun: ddp | fsdp


# --------------------------------------------------------------------------- checking


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``, if any."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def check_keys(schema: type, data: Any, path: str) -> None:
    """Rejects keys the schema does not know, recursing into nested dataclasses and dicts of dataclasses."""
    if not isinstance(data, (dict, DictConfig)):
        return
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}.{key}'{_suggest(str(key), list(hints))}")
        value, annotation = data[key], hints[key]
        nested = _dataclass_of(annotation)
        if nested is not None:
            check_keys(nested, value, f"{path}.{key}")
        elif typing.get_origin(annotation) is dict and isinstance(value, (dict, DictConfig)):
            value_type = typing.get_args(annotation)[1]
            if dataclasses.is_dataclass(value_type):
                for name, item in value.items():
                    check_keys(value_type, item, f"{path}.{key}.{name}")


def typed(schema: type, data: Any, path: str) -> DictConfig:
    """``data`` checked against ``schema``: unknown keys and wrong types raise ``ConfigError`` naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, (dict, DictConfig)):
        raise ConfigError(f"config section '{path}' must be a mapping, got {type(data).__name__}")
    check_keys(schema, data, path)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), data)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", "?")
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"bad value for config key '{path}.{key}': {first_line}") from None


def component(kind: str, data: Any, path: str) -> DictConfig:
    """A ``{"name": ..., **options}`` block checked against the registered class's ``Config`` dataclass."""
    from xllm.common.registry import registry

    if not isinstance(data, (dict, DictConfig)) or "name" not in data:
        raise ConfigError(f"config key '{path}' needs a 'name' naming a registered {kind}")
    try:
        cls = registry.get(kind, data["name"])
    except KeyError as error:
        raise ConfigError(f"config key '{path}.name': {error.args[0]}") from None
    options = {k: v for k, v in data.items() if k != "name"}
    checked = typed(cls.Config, options, path)
    checked_dict = OmegaConf.to_container(checked)
    return OmegaConf.create({"name": data["name"], **checked_dict})


# --------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml's own errors name a line, not the file
        raise ConfigError(f"cannot parse config file {path}: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top")
    return loaded


def model_defaults(arch: str, model_type: str) -> DictConfig:
    path = configs_dir() / "models" / arch / f"{model_type}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (configs_dir() / "models" / arch).glob("*.yaml"))
        raise ConfigError(f"no model defaults for arch {arch!r}, model_type {model_type!r} ({path}); "
                          f"known model types: {', '.join(available) or '(none)'}")
    return load_yaml(path).get("model", OmegaConf.create())


def resolve_model(model: Any) -> DictConfig:
    """Defaults for the model's arch/model_type, overridden by ``model``, checked, components included."""
    model = OmegaConf.create(model or {})
    arch, model_type = model.get("arch", "xllm"), model.get("model_type", "tiny")
    merged = OmegaConf.merge(model_defaults(arch, model_type), model)
    checked = typed(ModelConfig, merged, "model")
    if checked.checkpoint is not None and not all(isinstance(c, str) and c for c in as_list(checked.checkpoint)):
        raise ConfigError(f"config key 'model.checkpoint' must be a path or a list of paths, got {checked.checkpoint}")
    for name, modality in checked.modalities.items():
        for part in ("encoder", "interface", "adapter"):
            checked.modalities[name][part] = component(part, modality[part], f"model.modalities.{name}.{part}")
    return checked


def resolve_datasets(datasets: Any) -> DictConfig:
    checked = {}
    for name, entry in (datasets or {}).items():
        if not isinstance(entry, (dict, DictConfig)) or "builder" not in entry:
            raise ConfigError(f"config key 'datasets.{name}' needs a 'builder' naming a registered dataset builder")
        # ``ratio`` is every dataset's, not its builder's: the share of a mixture's samples drawn from it.
        renamed = {("name" if k == "builder" else k): v for k, v in entry.items() if k != "ratio"}
        block = component("builder", renamed, f"datasets.{name}")
        checked[name] = {("builder" if k == "name" else k): v for k, v in OmegaConf.to_container(block).items()}
        if "ratio" in entry:
            ratio = entry["ratio"]
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
                raise ConfigError(f"config key 'datasets.{name}.ratio' must be a positive number, got {ratio!r}")
            checked[name]["ratio"] = float(ratio)
    return OmegaConf.create(checked)


SECTIONS = ("model", "datasets", "run")


def load_with_base(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A run config, merged over the config its ``base:`` key names (a path relative to it), recursively."""
    raw = load_yaml(path)
    unknown = set(raw) - {*SECTIONS, "base"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown top-level key '{key}' in {path}{_suggest(key, [*SECTIONS, 'base'])}")
    if "base" not in raw:
        return raw
    base = (path.parent / raw.pop("base")).resolve()
    if base in seen:
        raise ConfigError(f"config {path} inherits from itself through {base}")
    return OmegaConf.merge(load_with_base(base, seen + (path.resolve(),)), raw)


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> DictConfig:
    """The run's whole configuration, with ``--options key=value`` overrides applied, checked."""
    raw = load_with_base(Path(cfg_path))
    if options:
        try:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(options)))
        except OmegaConfBaseException as error:
            raise ConfigError(f"bad --options {options}: {str(error).splitlines()[0]}") from None
    try:
        return OmegaConf.create({
            "model": resolve_model(raw.get("model")),
            "datasets": resolve_datasets(raw.get("datasets")),
            "run": typed(RunConfig, raw.get("run"), "run"),
        })
    except ConfigError as error:
        raise ConfigError(f"{cfg_path}: {error}") from None


def save_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
