import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from xllm.common.config import ConfigError
from xllm.config import load_config
from xllm.models.adapters import MLPAdapter
from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.common.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def test_registry_unknown_name_lists_known_and_closest():
    registry = Registry("llm backend")
    registry.register("hf_causal")(object)
    registry.register("chatglm")(object)
    with pytest.raises(KeyError) as error:
        registry.get("hf_casual")
    message = error.value.args[0]
    assert "known: chatglm, hf_causal" in message and "did you mean 'hf_causal'" in message


def test_registry_refuses_a_second_class_under_one_name():
    registry = Registry("task")
    registry.register("t")(int)
    with pytest.raises(KeyError, match="already registered"):
        registry.register("t")(float)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_full_path_and_suggestion(tmp_path):
    path = write(tmp_path, "run:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key 'run\.batch_sise'; did you mean 'batch_size'"):
        load_config(path)


def test_unknown_component_option_is_named(tmp_path):
    path = write(tmp_path, "model:\n  modalities:\n    image:\n      interface:\n        name: qformer\n"
                           "        num_query_token: 8\n")
    with pytest.raises(ConfigError, match=r"model\.modalities\.image\.interface\.num_query_token'; did you mean 'num_query_tokens'"):
        load_config(path)


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "run:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"bad value for config key 'run\.batch_size'"):
        load_config(path)


def test_unknown_builder_is_named(tmp_path):
    path = write(tmp_path, "datasets:\n  d:\n    builder: coco_captions\n")
    with pytest.raises(ConfigError, match=r"datasets\.d\.name.*did you mean 'coco_caption'"):
        load_config(path)


def test_model_defaults_options_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  batch_size: 3\n  lr: 0.5\n")
    path = write(tmp_path, "base: base.yaml\nrun:\n  lr: 0.25\n")
    cfg = load_config(path, ["run.max_steps=7"])
    assert (cfg.run.batch_size, cfg.run.lr, cfg.run.max_steps) == (3, 0.25, 7)
    # model defaults come from configs/models/xllm/tiny.yaml
    assert cfg.model.modalities.image.interface.num_query_tokens == 32
    assert cfg.model.llm.path == "zoo:tiny/llm"


def test_unknown_model_type_lists_known_ones():
    with pytest.raises(ConfigError, match="known model types: .*tiny"):
        resolve_model(OmegaConf.create({"arch": "xllm", "model_type": "tinny"}))


def test_shipped_run_configs_validate():
    for name in ("stage2_image.yaml", "eval_image_caption.yaml", "tiny/stage2_image.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.datasets.world_caption.builder == "coco_caption"


def test_a_typo_in_an_option_is_an_error_like_the_same_typo_in_the_file(tmp_path):
    path = write(tmp_path, "run:\n  max_steps: 2\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'runs' in --options runs.max_steps=3; did you mean 'run'"):
        load_config(path, ["runs.max_steps=3"])
    (tmp_path / "typo").mkdir()
    with pytest.raises(ConfigError, match="unknown top-level key 'runs' in .*run.yaml; did you mean 'run'"):
        load_config(write(tmp_path / "typo", "runs:\n  max_steps: 3\n"))
    with pytest.raises(ConfigError, match="unknown config key 'run.max_step'; did you mean 'max_steps'"):
        load_config(path, ["run.max_step=3"])


@pytest.mark.parametrize("key, value, choices", [
    ("run.lr_schedule", "cosin", "'cosine', 'linear', 'constant'"),
    ("run.amp", "bf32", "None, 'bf16', 'fp16'"),
    ("run.distributed", "zero3", "'ddp', 'fsdp', 'deepspeed'"),
    ("model.llm.overflow", "cut", "'refuse', 'truncate'"),
    ("model.llm.dtype", "float64", "'float32', 'bfloat16', 'float16'"),
])
def test_enumerated_values_are_checked_when_the_config_loads(tmp_path, key, value, choices):
    path = write(tmp_path, "run:\n  max_steps: 2\n")
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}' must be one of {re.escape(choices)}, "
                                          f"got '{value}'"):
        load_config(path, [f"{key}={value}"])


def test_names_are_checked_when_the_config_loads(tmp_path):
    path = write(tmp_path, "run:\n  task: image_txt\n")
    with pytest.raises(ConfigError, match="'run.task': unknown task 'image_txt'; known: cif_asr, llm, qformer_pretrain"):
        load_config(path)
    path = write(tmp_path, "datasets:\n  d:\n    builder: coco_caption\n    metric: captions\n")
    with pytest.raises(ConfigError, match="'datasets.d.metric': unknown metric 'captions'.*did you mean 'caption'"):
        load_config(path)
    path = write(tmp_path, "model:\n  llm:\n    backend: hf_casual\n")
    with pytest.raises(ConfigError, match="'model.llm.backend': unknown llm backend 'hf_casual'.*'hf_causal'"):
        load_config(path)


def test_a_component_may_be_named_by_dotted_path(micro_model_cfg):
    cfg = OmegaConf.merge(micro_model_cfg, {"modalities": {"image": {
        "adapter": {"name": "xllm.models.adapters.MLPAdapter", "hidden_dim": 8}}}})
    resolved = resolve_model(cfg)
    assert resolved.modalities.image.adapter.hidden_dim == 8
    with pytest.raises(ConfigError, match="'model.modalities.image.adapter.name': adapter 'xllm.models.adapters.Nope'"
                                          ": cannot import it as a dotted path"):
        resolve_model(OmegaConf.merge(cfg, {"modalities": {"image": {"adapter": {"name": "xllm.models.adapters.Nope"}}}}))
    assert isinstance(build_model(resolved).adapters["image"], MLPAdapter)


@pytest.mark.parametrize("option, key, problem", [
    ("model.checkpoint=/nonexistent/run", "model.checkpoint", "does not exist"),
    ("model.pretrained=[/nonexistent/blip2.pth]", "model.pretrained", "does not exist"),
    ("model.llm.path=./models/llm", "model.llm.path", "does not exist (a path, not a Hub id)"),
    ("model.modalities.image.encoder.path=/nonexistent", "model.modalities.image.encoder.path", "does not exist"),
    ("run.resume=/nonexistent/ckpt", "run.resume", "does not exist"),
    ("run.deepspeed=REPO", "run.deepspeed", "is not a file"),
    ("datasets.world_caption.world=null", "datasets.world_caption.storage", "does not exist"),
])
def test_every_input_path_is_checked_before_work_naming_its_key(option, key, problem):
    from xllm.config import check_paths

    options = [option.replace("REPO", str(REPO)), "datasets.world_caption.storage=/nonexistent/world"]
    cfg = load_config(REPO / "configs/tiny/stage2_image.yaml", options)
    with pytest.raises(OSError) as error:
        check_paths(cfg)
    assert f"config key '{key}'" in str(error.value) and problem in str(error.value)


def test_path_checks_leave_hub_ids_zoo_paths_generated_folders_and_latest_alone(tmp_path):
    from xllm.config import check_paths

    options = ["model.llm.path=HuggingFaceTB/SmolLM2-135M-Instruct", "run.resume=latest",
               f"datasets.world_caption.storage={tmp_path / 'made-by-the-world'}"]
    check_paths(load_config(REPO / "configs/tiny/stage2_image.yaml", options))  # no error: nothing is read yet
    unreadable = tmp_path / "locked"
    unreadable.mkdir()
    unreadable.chmod(0)
    try:
        if os.access(unreadable, os.R_OK):
            pytest.skip("running as a user who reads every folder (root)")
        with pytest.raises(PermissionError, match="config key 'model.checkpoint'.*cannot be read"):
            check_paths(load_config(REPO / "configs/tiny/stage2_image.yaml", [f"model.checkpoint={unreadable}"]))
    finally:
        unreadable.chmod(0o755)


def test_train_refuses_a_missing_input_before_building_anything(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--cfg-path", "tiny/stage2_image.yaml",
                             "--options", f"run.output_dir={tmp_path / 'run'}", "model.checkpoint=/nonexistent/x"],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "XLLM_CACHE": str(tmp_path)})
    assert result.returncode != 0
    assert "config key 'model.checkpoint': /nonexistent/x does not exist" in result.stderr
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "run").exists()  # no zoo built, no output folder
