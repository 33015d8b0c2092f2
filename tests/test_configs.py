"""Every YAML file under configs/ loads and validates: run configs through ``load_config``, model defaults through
``resolve_model``. Nothing is built, so the paper's configs are checked without their weights."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from xllm.common.config import ConfigError
from xllm.config import load_config
from xllm.models.config import resolve_model
from xllm.common.paths import configs_dir

CONFIGS = configs_dir()
MODEL_DEFAULTS = sorted((CONFIGS / "models").rglob("*.yaml"))
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p not in MODEL_DEFAULTS)


def test_configs_are_found() -> None:
    names = {str(p.relative_to(CONFIGS)) for p in RUN_CONFIGS}
    assert {"tiny/stage1_image.yaml", "tiny/eval_retrieval.yaml", "paper/stage1_image.yaml", "paper/stage2_image.yaml",
            "paper/stage2_speech.yaml", "paper/stage2_video.yaml", "paper/stage3.yaml"} <= names
    assert CONFIGS / "models" / "xllm" / "paper.yaml" in MODEL_DEFAULTS


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.datasets, f"{path} names no dataset"
    assert cfg.model.modalities, f"{path} names no modality"


@pytest.mark.parametrize("path", MODEL_DEFAULTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_model_defaults_validate(path: Path) -> None:
    arch, model_type = path.parent.name, path.stem
    declared = OmegaConf.load(path).model
    assert (declared.arch, declared.model_type) == (arch, model_type), f"{path} declares another arch/model_type"
    assert resolve_model({"arch": arch, "model_type": model_type}).modalities


def test_paper_recipes_hold_the_published_hyper_parameters() -> None:
    """X-LLM's stage configs (phellonchen/X-LLM xllm/projects/train/*.yaml) and the paper's model sizes."""
    image = load_config(CONFIGS / "paper" / "stage2_image.yaml")
    assert (image.run.lr, image.run.min_lr, image.run.warmup_steps, image.run.lr_schedule) == (3e-5, 1e-8, 6000, "cosine")
    assert (image.run.batch_size, image.run.grad_accum_steps, image.run.max_epochs) == (1, 32, 2)
    speech = load_config(CONFIGS / "paper" / "stage2_speech.yaml").run
    assert (speech.lr, speech.max_epochs) == (1e-4, 30)
    video = load_config(CONFIGS / "paper" / "stage2_video.yaml")
    assert video.run.lr == 1e-5 and video.datasets.video_caption_zh.num_frames == 5
    stage3 = load_config(CONFIGS / "paper" / "stage3.yaml").run
    assert (stage3.lr, stage3.lr_schedule) == (1e-6, "constant")
    model = image.model
    vit, qformer = model.modalities.image.encoder, model.modalities.image.interface
    assert (vit.image_size, vit.patch_size, vit.hidden_size, vit.num_hidden_layers) == (224, 14, 1408, 39)
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.num_query_tokens) == (768, 12, 32)
    assert (model.llm.backend, model.modalities.speech.encoder.name) == ("chatglm", "whisper")


def test_a_typo_names_its_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS / 'tiny' / 'stage1_image.yaml'}\nmodel:\n  modalities:\n    image:\n"
                   "      interface:\n        embed_dimm: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.modalities.image.interface.embed_dimm.*embed_dim"):
        load_config(bad)


def test_an_installed_package_finds_its_configs(tmp_path: Path) -> None:
    """A non-editable install (a wheel) carries every config, and a run config loads by its packaged name."""
    repo, source = Path(__file__).resolve().parents[1], tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(repo / name, source / name)
    shutil.copytree(repo / "xllm", source / "xllm", ignore=shutil.ignore_patterns("__pycache__"))
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("xllm-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    assert shipped == {f"xllm/configs/{p.relative_to(CONFIGS)}" for p in CONFIGS.rglob("*.yaml")}
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    script = ("import xllm; from xllm.config import load_config; cfg = load_config('tiny/stage2_image.yaml'); "
              "print(xllm.__file__, cfg.model.llm.path)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(target / "xllm" / "__init__.py"), "zoo:tiny/llm"]
