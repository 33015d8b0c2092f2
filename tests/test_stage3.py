"""Stage 3: checkpoint lists, ratio mixtures, per-task losses, and a run that trains only the adapters."""

import json
from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import save_file

from xllm.common.config import ConfigError
from xllm.config import load_config
from xllm.datasets.config import resolve_datasets
from xllm.models.config import resolve_model
from xllm.datasets.build import build_split
from xllm.datasets.loader import evaluation_loader, training_loader
from xllm.datasets.mixture import MixtureDataset
from xllm.models.builder import build_model
from xllm.datasets.mixture import concat, training_set
from xllm.runners.runner import Runner
from xllm.tasks.base import LLMTask

SIGNAL = {"encoder": {"name": "signal", "channels": 4},
          "interface": {"name": "sequence", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                        "num_query_tokens": 3, "max_steps": 32}}
SIGNAL_WORLD = {"seed": 0, "num_train": 12, "num_val": 4, "num_test": 4, "steps": 16}


class Numbers(torch.utils.data.Dataset):
    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"id": f"{self.name}{index}"}


def test_mixture_follows_ratios_and_seed():
    parts = {"a": Numbers("a", 10), "b": Numbers("b", 50)}
    mixture = MixtureDataset(parts, {"a": 3.0, "b": 1.0}, seed=1)
    assert len(mixture) == 60
    tasks = Counter(mixture[i]["task"] for i in range(len(mixture)))
    assert tasks == {"a": 45, "b": 15}
    a_ids = Counter(mixture[i]["id"] for i in range(len(mixture)) if mixture[i]["task"] == "a")
    assert set(a_ids) == {f"a{i}" for i in range(10)} and max(a_ids.values()) - min(a_ids.values()) <= 1
    again = MixtureDataset(parts, {"a": 3.0, "b": 1.0}, seed=1)
    other = MixtureDataset(parts, {"a": 3.0, "b": 1.0}, seed=2)
    assert again.plan == mixture.plan and other.plan != mixture.plan


def test_ratio_is_checked_for_every_builder(micro_world):
    assert resolve_datasets({"w": {"builder": "coco_caption", "ratio": 2, **micro_world}}).w.ratio == 2.0
    with pytest.raises(ConfigError, match=r"datasets\.w\.ratio' must be a positive number, got -1"):
        resolve_datasets({"w": {"builder": "coco_caption", "ratio": -1, **micro_world}})


def test_checkpoint_list_loads_in_order_later_ones_win(micro_model_cfg, tmp_path):
    model = build_model(resolve_model(micro_model_cfg))
    shape = model.adapters.image.bias.shape
    save_file({"adapters.image.bias": torch.full(shape, 1.0), "adapters.image.weight":
               torch.zeros_like(model.adapters.image.weight)}, str(tmp_path / "first.safetensors"))
    save_file({"adapters.image.bias": torch.full(shape, 2.0)}, str(tmp_path / "second.safetensors"))
    cfg = dict(micro_model_cfg, checkpoint=[str(tmp_path / "first.safetensors"), str(tmp_path / "second.safetensors")])
    loaded = build_model(resolve_model(cfg))
    assert torch.equal(loaded.adapters.image.bias, torch.full(shape, 2.0))
    assert torch.equal(loaded.adapters.image.weight, torch.zeros_like(loaded.adapters.image.weight))
    with pytest.raises(ConfigError, match="model.checkpoint' must be a path or a list of paths"):
        resolve_model(dict(micro_model_cfg, checkpoint=[str(tmp_path / "first.safetensors"), 3]))


@pytest.fixture(scope="module")
def stage3_cfg(micro_model_cfg, micro_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    # tiny_signal's defaults hold the signal modality only (tiny_all's would add the zoo's speech encoder).
    model = dict(micro_model_cfg, model_type="tiny_signal",
                 modalities={"image": micro_model_cfg["modalities"]["image"], "signal": SIGNAL},
                 trainable=["adapters"])
    config = {"model": model,
              "datasets": {
                  "caption": {"builder": "coco_caption", "ratio": 1.0, **micro_world},
                  "dialogue": {"builder": "world_qa", "mode": "dialogue", "ratio": 1.0, **micro_world},
                  "status": {"builder": "signal_text", "ratio": 2.0, "world": SIGNAL_WORLD,
                             "storage": str(root / "signals")}},
              "run": {"task": "llm", "output_dir": str(root / "run"), "log_interval": 1, "lr": 1e-2,
                      "warmup_steps": 1, "batch_size": 6, "max_steps": 3, "seed": 0, "val_max_batches": 1}}
    path = root / "stage3.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_dialogue_rounds_go_through_the_backend_template(stage3_cfg):
    sample = build_split(stage3_cfg.datasets, "train")["dialogue"][0]
    (first_query, first_answer), = sample["history"]
    assert first_query == "<Image><ImageHere></Image> Describe the image." and first_answer.endswith(".")
    model = build_model(stage3_cfg.model)
    text = model.llm.layout.format_prompt(sample["prompt"], sample["history"])
    assert text.index(first_answer) < text.index(sample["prompt"]) and text.count("<ImageHere>") == 1


def test_per_task_losses_add_up_to_the_batch_loss(stage3_cfg):
    torch.manual_seed(0)
    model = build_model(stage3_cfg.model)
    sets = build_split(stage3_cfg.datasets, "train")
    tasks = ["caption", "status", "dialogue", "status"]
    samples = [sets["caption"][0], sets["status"][0], sets["dialogue"][1], sets["status"][1]]
    batch = model.collator()([{**sample, "task": task} for sample, task in zip(samples, tasks)])
    output = model(batch)
    loss, sums, counts = output.loss, output.row_loss, output.row_units
    assert torch.allclose(sums.sum() / counts.sum(), loss, atol=1e-5)
    out = LLMTask(stage3_cfg.run).train_step(model, batch)
    assert out.weight == int(counts.sum())
    pooled = sum(v[0] * v[1] for key, v in out.logs.items() if key.startswith("loss/"))
    assert pooled / out.weight == pytest.approx(out.logs["loss"], rel=1e-4)
    assert out.logs["loss/status"][1] == float(counts[1] + counts[3])


def test_stage3_trains_only_adapters_and_logs_each_task(stage3_cfg, capsys):
    torch.manual_seed(0)
    model = build_model(stage3_cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = training_set(build_split(stage3_cfg.datasets, "train"), stage3_cfg.datasets, stage3_cfg.run.seed)
    val = concat(list(build_split(stage3_cfg.datasets, "val").values()))
    task = LLMTask(stage3_cfg.run)
    runner = Runner(stage3_cfg.run, model, task,
                    training_loader(train, task.collator(model, True), stage3_cfg.run.batch_size, stage3_cfg.run.seed),
                    evaluation_loader(val, task.collator(model, True), stage3_cfg.run.eval_batch_size))
    assert isinstance(runner.train_loader.dataset, MixtureDataset)
    assert runner.train_loader.dataset.counts == {"caption": len(train) // 4, "dialogue": len(train) // 4,
                                       "status": len(train) // 2}
    runner.train()
    table = capsys.readouterr().out
    assert "adapters.signal" in table and "interfaces.image" in table  # the manifest is printed
    changed = sorted({n for n, p in model.named_parameters() if not torch.equal(p, before[n])})
    assert changed and all(n.startswith("adapters.") for n in changed)
    assert {"adapters.image.weight", "adapters.signal.weight"} <= set(changed)
    logs = [json.loads(line) for line in (runner.output_dir / "log.jsonl").read_text().splitlines()]
    train_keys = set().union(*(row for row in logs if row["split"] == "train"))
    assert {"loss/caption", "loss/dialogue", "loss/status"} <= train_keys
