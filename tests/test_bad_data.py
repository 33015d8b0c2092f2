"""Unreadable training files are caught in the worker, replaced and reported, or stop the run when too many."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from xllm.config import load_config
from xllm.datasets.build import build_split
from xllm.datasets.guard import dropped_records, scan
from xllm.datasets.loader import training_loader
from xllm.models.builder import build_model
from xllm.runners.runner import BadDataError, Runner
from xllm.tasks.base import LLMTask


def corrupt(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 3], "text": b"not an image at all", "empty": b"",
                      "header": b"\x00" * 16 + data[16:]}[how])


@pytest.fixture
def broken_world(tmp_path, micro_model_cfg):
    world = {"storage": str(tmp_path / "world"), "image_size": 32, "on_bad_sample": "skip",
             "world": {"seed": 1, "num_train": 80, "num_val": 4, "num_test": 4, "image_size": 32, "shard_size": 100}}
    config = {"model": micro_model_cfg, "datasets": {"w": {"builder": "coco_caption", **world}},
              "run": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_epochs": 1, "log_interval": 5,
                      "seed": 3, "lr": 1e-3}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "cfg.yaml")
    dataset = build_split(cfg.datasets, "train")["w"]
    broken = {3: "truncated", 17: "text", 42: "empty", 66: "header"}  # 4 of 80: 5 %
    for index, how in broken.items():
        corrupt(tmp_path / "world" / dataset.records[index]["image"], how)
    return cfg, dataset, broken


def runner_for(cfg, dataset) -> Runner:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    task = LLMTask(cfg.run)
    return Runner(cfg.run, model, task, training_loader(dataset, task.collator(model, True), 4, cfg.run.seed,
                                                        num_workers=2))


def test_an_epoch_with_five_percent_broken_files_completes_and_names_them(broken_world):
    cfg, dataset, broken = broken_world
    assert {p["record"] for p in scan({"w": dataset}, max_bad_fraction=0.1)} == set(broken)
    runner = runner_for(cfg, dataset)
    runner.train()
    assert runner.step == 20  # every batch kept its four samples
    reported = [json.loads(line) for line in (runner.output_dir / "bad_samples.jsonl").read_text().splitlines()]
    assert [p["record"] for p in reported] == sorted(broken)
    for problem in reported:
        assert dataset.records[problem["record"]]["image"].split("/")[-1] in problem["error"]


def test_too_many_broken_files_stop_before_the_first_step(broken_world):
    cfg, dataset, broken = broken_world
    with pytest.raises(ValueError, match=r"4 of 80 training samples are unreadable \(5.0 %\), more than "
                                         r"run.max_bad_fraction=0.01: w record 3: cannot read image file"):
        scan({"w": dataset}, max_bad_fraction=0.01)
    # The running check, for data that breaks once training is under way: it stops at the first window that
    # passes the limit, before that window's optimizer step.
    cfg.run.max_bad_fraction = 0.01
    runner = runner_for(cfg, dataset)
    order = runner.train_loader.sampler._indices()
    first_bad_window = min(order.index(i) for i in broken) // 4
    with pytest.raises(BadDataError, match=r"more than run.max_bad_fraction=0.01; first: dataset w record"):
        runner.train()
    assert runner.step == first_bad_window


def test_without_skip_a_broken_file_names_dataset_record_and_file(broken_world):
    cfg, dataset, broken = broken_world
    dataset.skip = False
    with pytest.raises(ValueError, match=r"dataset 'w', record 17: cannot read image file .*\.png"):
        dataset[17]


def test_records_dropped_while_reading_count_and_are_listed_with_the_replaced_ones(tmp_path, broken_world):
    cfg, dataset, broken = broken_world
    annotations = tmp_path / "world" / "annotations" / "train.json"
    records = json.loads(annotations.read_text())
    records[5]["caption"] = None
    (tmp_path / "world" / records[9]["image"]).unlink()
    annotations.write_text(json.dumps(records))
    parts = build_split(cfg.datasets, "train")
    assert len(parts["w"]) == 78
    with pytest.raises(ValueError, match=r"6 of 80 training samples are unreadable \(7.5 %\).*w record 5: record 5 "
                                         r"in .*train.json: field 'caption' must be a non-empty string, got None"):
        scan(parts, max_bad_fraction=0.05)
    # The broken images are named by their records' places in the file, not the dataset's after the drops.
    assert [p["record"] for p in scan(parts, max_bad_fraction=0.1)][2:] == sorted(broken)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    task = LLMTask(cfg.run)
    loader = training_loader(parts["w"], task.collator(model, True), 4, cfg.run.seed, num_workers=0)
    runner = Runner(cfg.run, model, task, loader, dropped=dropped_records(parts))
    runner.train()
    reported = [json.loads(line) for line in (runner.output_dir / "bad_samples.jsonl").read_text().splitlines()]
    assert [(p["record"], p.get("dropped", False)) for p in reported[:2]] == [(5, True), (9, True)]
    assert "file not found" in reported[1]["error"]
    assert [p["record"] for p in reported[2:]] == sorted(broken)
    for problem in reported[2:]:
        assert records[problem["record"]]["image"].split("/")[-1] in problem["error"]
