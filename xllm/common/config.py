"""Configuration machinery: OmegaConf YAML checked against dataclasses, with errors that name the key.

Every section of a config is validated before anything is built: an unknown key is an error naming its
full path and the closest known key, a value of the wrong type or outside a field's choices is an error
naming its full path. A pluggable component's block (``{name: qformer, ...}``) is checked against the
``Config`` dataclass of the class registered under that name, so a component owns its options. The schemas
themselves live with the code they configure (``xllm.models.config``, ``xllm.datasets.config``,
``xllm.config`` for the run).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xllm.common.registry import Registry


class ConfigError(ValueError):
    """A configuration problem, always naming the file or the key."""


def choice(default: Any, *others: Any) -> Any:
    """A dataclass field whose value must be ``default`` or one of ``others``, checked when the config loads."""
    return field(default=default, metadata={"choices": (default, *others)})


PATH_KINDS = ("file", "folder", "any", "model")  # "model": a folder, or a Hub id (``org/name``) when none is there


def path_field(kind: str = "any", made_by: str | None = None, **options: Any) -> Any:
    """A dataclass field naming a file or folder the run reads (``kind``, one of ``PATH_KINDS``), checked to exist
    and be readable before any work starts (``config_paths`` lists them); an empty value, or a set ``made_by``
    sibling field (a ``world`` block that generates the folder), exempts it. ``options`` go to ``field``."""
    assert kind in PATH_KINDS, kind
    return field(metadata={"path": kind, "made_by": made_by}, **options)


def config_paths(schema: type, data: Any, path: str):
    """(key, value, kind) of every path field ``data`` sets, nested dataclasses included; list values give one
    entry per item, mapping values (a file per split) one per key."""
    if not isinstance(data, (dict, DictConfig)):
        return
    for spec in dataclasses.fields(schema):
        kind, made_by = spec.metadata.get("path"), spec.metadata.get("made_by")
        value = data.get(spec.name)
        if kind is None or not value or (made_by and data.get(made_by)):
            continue
        if isinstance(value, (dict, DictConfig)):
            items = [(f".{name}", item) for name, item in value.items()]
        else:
            values = as_list(value)
            items = [(f"[{index}]" if len(values) > 1 else "", item) for index, item in enumerate(values)]
        for suffix, item in items:
            if isinstance(item, (str, Path)) and str(item):
                yield f"{path}.{spec.name}{suffix}", str(item), kind
    for nested, value, nested_path in _nested_schemas(schema, data, path):
        yield from config_paths(nested, value, nested_path)


def suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``, if any."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return next((t for t in (annotation, *args) if dataclasses.is_dataclass(t)), None)


def _nested_schemas(schema: type, data: Any, path: str):
    """(schema, value, path) of every nested dataclass value, dicts of dataclasses included."""
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in hints:
            continue
        value, annotation = data[key], hints[key]
        nested = _dataclass_of(annotation)
        if nested is not None:
            yield nested, value, f"{path}.{key}"
        elif typing.get_origin(annotation) is dict and isinstance(value, (dict, DictConfig)):
            value_type = typing.get_args(annotation)[1]
            if dataclasses.is_dataclass(value_type):
                for name, item in value.items():
                    yield value_type, item, f"{path}.{key}.{name}"


def check_keys(schema: type, data: Any, path: str) -> None:
    """Rejects keys the schema does not know, recursing into nested dataclasses and dicts of dataclasses."""
    if not isinstance(data, (dict, DictConfig)):
        return
    known = [f.name for f in dataclasses.fields(schema)]
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{path}.{key}'{suggest(str(key), known)}")
    for nested, value, nested_path in _nested_schemas(schema, data, path):
        check_keys(nested, value, nested_path)


def check_choices(schema: type, data: DictConfig, path: str) -> None:
    """Every field made with ``choice`` holds one of its values, nested dataclasses included."""
    for spec in dataclasses.fields(schema):
        choices = spec.metadata.get("choices")
        if choices is not None and data.get(spec.name) not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"config key '{path}.{spec.name}' must be one of {shown}, got {data.get(spec.name)!r}")
    for nested, value, nested_path in _nested_schemas(schema, data, path):
        if isinstance(value, DictConfig):
            check_choices(nested, value, nested_path)


def typed(schema: type, data: Any, path: str) -> DictConfig:
    """``data`` checked against ``schema``: unknown keys, wrong types and values outside a field's choices raise
    ``ConfigError`` naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, (dict, DictConfig)):
        raise ConfigError(f"config section '{path}' must be a mapping, got {type(data).__name__}")
    check_keys(schema, data, path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", "?")
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"bad value for config key '{path}.{key}': {first_line}") from None
    check_choices(schema, merged, path)
    return merged


def registered(registry: Registry, name: str, key: str) -> Any:
    """What ``registry`` holds under ``name``, the value of config key ``key``; an unknown name is a config error."""
    try:
        return registry.get(name)
    except KeyError as error:
        raise ConfigError(f"config key '{key}': {error.args[0]}") from None


def component(registry: Registry, data: Any, path: str) -> DictConfig:
    """A ``{"name": ..., **options}`` block checked against the registered class's ``Config`` dataclass."""
    if not isinstance(data, (dict, DictConfig)) or "name" not in data:
        raise ConfigError(f"config key '{path}' needs a 'name' naming a registered {registry.kind}")
    cls = registered(registry, data["name"], f"{path}.name")
    options = {k: v for k, v in data.items() if k != "name"}
    checked = OmegaConf.to_container(typed(cls.Config, options, path))
    return OmegaConf.create({"name": data["name"], **checked})


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


def check_top_level(raw: DictConfig, sections: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown top-level key '{unknown[0]}' in {where}{suggest(unknown[0], list(sections))}")


def load_with_base(path: Path, sections: tuple[str, ...], seen: tuple[Path, ...] = ()) -> DictConfig:
    """A config merged over the config its ``base:`` key names, recursively. ``base`` is the one path that is
    relative to the file holding it: it names another config, which moves with it."""
    raw = load_yaml(path)
    check_top_level(raw, (*sections, "base"), str(path))
    if "base" not in raw:
        return raw
    base = (path.parent / raw.pop("base")).resolve()
    if base in seen:
        raise ConfigError(f"config {path} inherits from itself through {base}")
    return OmegaConf.merge(load_with_base(base, sections, seen + (path.resolve(),)), raw)


RUN_CONFIG = "config.yaml"  # the resolved config train.py and evaluate.py save in their output folders


def save_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    path = Path(output_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
