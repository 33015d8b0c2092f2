"""train.py then evaluate.py as a user runs them, on the micro models and a micro world."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def micro_options(micro_zoo, micro_world, output_dir: Path) -> list[str]:
    world = micro_world["world"]
    return [f"model.llm.path={micro_zoo['llm']}",
            f"model.modalities.image.encoder.path={micro_zoo['image_encoder']}",
            "model.modalities.image.interface.num_query_tokens=4",
            "model.modalities.image.interface.hidden_size=32",
            "model.modalities.image.interface.intermediate_size=64",
            f"datasets.world_caption.storage={micro_world['storage']}",
            "datasets.world_caption.image_size=32",
            *[f"datasets.world_caption.world.{k}={v}" for k, v in world.items()],
            f"run.output_dir={output_dir}", "run.threads=1"]


def test_train_then_evaluate(tmp_path, micro_zoo, micro_world):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    common = micro_options(micro_zoo, micro_world, train_dir)
    trained = run(["train.py", "--cfg-path", "configs/stage2_image.yaml", "--options", *common,
                   "run.max_steps=2", "run.batch_size=4", "run.log_interval=1"], REPO)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trainable" in trained.stdout and "interfaces.image" in trained.stdout
    assert (train_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert (train_dir / "config.yaml").is_file()

    options = micro_options(micro_zoo, micro_world, eval_dir) + ["run.max_new_tokens=3"]
    evaluated = run(["evaluate.py", "--cfg-path", "configs/eval_image_caption.yaml", "--checkpoint",
                     str(train_dir), "--options", *options], REPO)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((eval_dir / "report.json").read_text())["world_caption"]
    assert report["samples"] == micro_world["world"]["num_test"]
    assert {"exact_match", "bleu4", "accuracy_kind", "accuracy_colour", "accuracy_size", "accuracy_position"} <= set(report)
    assert "accuracy_colour" in evaluated.stdout
    predictions = (eval_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == micro_world["world"]["num_test"]


def test_a_config_error_names_the_key(tmp_path):
    result = run(["train.py", "--cfg-path", "configs/stage2_image.yaml", "--options", "run.batchsize=4"], REPO)
    assert result.returncode != 0
    assert "unknown config key 'run.batchsize'; did you mean 'batch_size'?" in result.stderr
