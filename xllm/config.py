"""A run's whole configuration: ``model``, ``datasets`` and ``run``, each checked before anything is built.

``load_config(path, options)`` reads the YAML file (a path, or one inside the packaged configs such as
``tiny/stage2_image.yaml``), merges it over its ``base:``, applies ``--options a.b=c`` overrides, and checks
every section: an unknown key (a typo in the file or in an option alike) or a value outside a field's choices
is an error naming it, before anything is built or downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xllm.common.config import (ConfigError, check_top_level, choice, config_paths, load_with_base, path_field, registered,
                                typed)
from xllm.common.dtypes import AMP_DTYPES
from xllm.common.paths import check_readable, find_config
from xllm.datasets.config import resolve_datasets
from xllm.datasets.registry import BUILDERS
from xllm.eval.metrics import METRICS
from xllm.models.config import ModelConfig, component_blocks, resolve_model
from xllm.tasks.registry import TASKS

SECTIONS = ("model", "datasets", "run")


@dataclass
class RunConfig:
    task: str = "llm"  # a registered task: llm | qformer_pretrain | cif_asr
    output_dir: str = "outputs/run"
    seed: int = 42
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    amp: str | None = choice(None, *AMP_DTYPES)  # bf16 or fp16 autocast; None for full precision
    max_epochs: int = 1
    max_steps: int | None = None  # stops early when set
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = choice("cosine", "linear", "constant")
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0
    num_workers: int = 0
    # Training batches of one modality and about one length (xllm.datasets.loader.LengthGroupedSampler): less
    # padding for speech, dialogues and mixtures; the order then depends on the global batch too.
    group_by_length: bool = False
    log_interval: int = 10
    val_interval: int | None = None  # optimizer steps between validations; None: once per epoch
    val_max_batches: int | None = None
    save_interval: int | None = None  # optimizer steps between checkpoints; None: once per epoch
    keep_last: int = 2
    keep_best: bool = False  # also keep the checkpoint with the lowest validation loss, however old
    on_nan: str = choice("skip", "stop")  # a step with a non-finite loss or gradient norm: skipped, or the end
    max_nan_skips: int = 3  # such steps in a row that are skipped before the run stops
    # The share of unreadable training samples (replaced with on_bad_sample: skip) past which the run stops.
    max_bad_fraction: float | None = None
    resume: str | None = path_field("folder", default=None)  # a checkpoint folder, or "latest"
    max_new_tokens: int = 40
    num_beams: int = 1
    eval_split: str = "test"
    eval_max_samples: int | None = None
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    distributed: str = choice("ddp", "fsdp", "deepspeed")  # strategy when launched with torchrun (xllm.runners.parallel)
    deepspeed: Any = path_field("file", default=None)  # DeepSpeed's config: a mapping, or the path of its JSON file (distributed: deepspeed)
    # Samples per optimizer step over every process; sets batch_size = global / (processes x grad_accum_steps).
    global_batch_size: int | None = None


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> DictConfig:
    """The run's whole configuration, with ``--options key=value`` overrides applied, checked."""
    path = find_config(cfg_path)
    try:
        raw = load_with_base(path, SECTIONS)
        if options:
            try:
                overrides = OmegaConf.from_dotlist(list(options))
            except OmegaConfBaseException as error:
                raise ConfigError(f"bad --options {options}: {str(error).splitlines()[0]}") from None
            check_top_level(overrides, SECTIONS, f"--options {' '.join(options)}")
            raw = OmegaConf.merge(raw, overrides)
        cfg = OmegaConf.create({
            "model": resolve_model(raw.get("model")),
            "datasets": resolve_datasets(raw.get("datasets")),
            "run": typed(RunConfig, raw.get("run"), "run"),
        })
        registered(TASKS, cfg.run.task, "run.task")
        for name, entry in cfg.datasets.items():
            registered(METRICS, entry.metric, f"datasets.{name}.metric")
        return cfg
    except ConfigError as error:
        raise ConfigError(f"{cfg_path}: {error}") from None


def check_paths(cfg: DictConfig) -> None:
    """Every file and folder the config names exists and can be read, before any work starts: an error names the
    config key. Paths inside a dataset's folder (annotations, shards) are its builder's to check."""
    found = list(config_paths(RunConfig, cfg.run, "run")) + list(config_paths(ModelConfig, cfg.model, "model"))
    for schema, block, where in component_blocks(cfg.model):
        found += config_paths(schema, block, where)
    for name, entry in cfg.datasets.items():
        found += config_paths(BUILDERS.get(entry.builder).Config, entry, f"datasets.{name}")
    for key, value, kind in found:
        if not (key == "run.resume" and value == "latest"):
            check_readable(value, kind, key)


def per_process_batch_size(run: DictConfig, world_size: int) -> int:
    """``run.batch_size``, or ``run.global_batch_size`` shared out over the processes and accumulation steps:
    an error when they do not divide it."""
    if run.global_batch_size is None:
        return run.batch_size
    per_step = world_size * run.grad_accum_steps
    if run.global_batch_size % per_step:
        raise ConfigError(f"run.global_batch_size={run.global_batch_size} does not divide by {world_size} processes "
                          f"x run.grad_accum_steps={run.grad_accum_steps}")
    return run.global_batch_size // per_step
