import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from xllm.config import load_config
from xllm.datasets.build import build_split
from xllm.models.builder import build_model
from xllm.datasets.loader import evaluation_loader, training_loader
from xllm.runners.runner import Runner
from xllm.runners.schedule import lr_factor
from xllm.tasks.base import LLMTask


def make_cfg(tmp_path, micro_model_cfg, micro_world, **run):
    config = {"model": micro_model_cfg,
              "datasets": {"world": {"builder": "coco_caption", **micro_world}},
              "run": {"output_dir": str(tmp_path / "run"), "log_interval": 1, "lr": 1e-2, "warmup_steps": 1,
                      "batch_size": 4, "seed": 3, **run}}
    path = tmp_path / "cfg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def make_runner(cfg) -> Runner:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    collator = model.collator()
    train = training_loader(build_split(cfg.datasets, "train")["world"], collator, cfg.run.batch_size, cfg.run.seed,
                            group_by_length=cfg.run.group_by_length)
    val = evaluation_loader(build_split(cfg.datasets, "val")["world"], collator, cfg.run.eval_batch_size)
    return Runner(cfg.run, model, LLMTask(cfg.run), train, val)


def trained(runner: Runner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in runner.model.named_parameters() if p.requires_grad}


def with_sgd(runner: Runner) -> Runner:
    """Plain SGD at lr 1: the update is the gradient itself, so its scale is checked too (Adam hides it)."""
    strategy = runner.strategy
    strategy.optimizer = torch.optim.SGD([p for p in runner.model.parameters() if p.requires_grad], lr=1.0)
    strategy.scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lambda step: 1.0)
    return runner


def test_accumulation_equals_one_large_batch(tmp_path, micro_model_cfg, micro_world):
    big = with_sgd(make_runner(make_cfg(tmp_path / "a", micro_model_cfg, micro_world, max_steps=2, batch_size=4,
                                        grad_clip=None)))
    big.train()
    small = with_sgd(make_runner(make_cfg(tmp_path / "b", micro_model_cfg, micro_world, max_steps=2, batch_size=2,
                                          grad_accum_steps=2, grad_clip=None)))
    small.train()
    for name, value in trained(big).items():
        assert torch.allclose(value, trained(small)[name], atol=1e-6), name


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_continues_exactly(group_by_length, tmp_path, micro_model_cfg, micro_world):
    cfg = make_cfg(tmp_path, micro_model_cfg, micro_world, max_steps=4, save_interval=2, keep_last=3,
                   val_interval=2, val_max_batches=1, group_by_length=group_by_length)
    unbroken = make_runner(cfg)
    last = unbroken.train()
    assert last.name == "step_4"
    resumed = make_runner(cfg)
    resumed.resume(tmp_path / "run" / "checkpoints" / "step_2")
    assert resumed.step == 2
    resumed.train()
    for name, value in trained(unbroken).items():
        assert torch.allclose(value, trained(resumed)[name], atol=1e-6), name
    # a checkpoint holds the trainable parameters only
    keys = set(load_file(str(last / "model.safetensors")))
    assert keys == set(trained(unbroken)) and not any(k.startswith("llm.") for k in keys)
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"train", "val"} <= {row["split"] for row in logs}


def test_a_length_grouped_run_resumes_only_with_its_global_batch(tmp_path, micro_model_cfg, micro_world):
    make_runner(make_cfg(tmp_path, micro_model_cfg, micro_world, max_steps=2, batch_size=4,
                         group_by_length=True)).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    # 8 samples seen divide by a batch of 2, but the grouped order was laid out for global batches of 4.
    with pytest.raises(ValueError, match=r"grouped by length depend on the global batch, 4 samples when saved and 2 "
                                         r"now \(1 processes x batch 2\); keep it \(run.global_batch_size\)"):
        make_runner(make_cfg(tmp_path, micro_model_cfg, micro_world, batch_size=2,
                             group_by_length=True)).resume(checkpoint)
    make_runner(make_cfg(tmp_path, micro_model_cfg, micro_world, batch_size=2)).resume(checkpoint)  # shuffled: fine


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(11)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert lr_factor(5, 10, 0, "constant", 0.0) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(5, 10, 0, "cosin", 0.0)


def test_warmup_from_zero_is_transformers_cosine_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=4, num_training_steps=20)
    theirs = []
    for _ in range(20):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [lr_factor(s, 20, 4, "cosine", 0.0, warmup_from_zero=True) for s in range(20)] == theirs
    assert theirs[0] == 0.0 and lr_factor(0, 20, 4, "cosine", 0.0) == 0.25


def test_weight_decay_spares_biases_and_norms(tmp_path, micro_model_cfg, micro_world):
    runner = make_runner(make_cfg(tmp_path, micro_model_cfg, micro_world, max_steps=1))
    decay, no_decay = runner.strategy.optimizer.param_groups
    names = {id(p): n for n, p in runner.model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(names[id(p)].endswith("layernorm.weight") for p in no_decay["params"])


def test_bf16_autocast_run_follows_the_fp32_run(tmp_path, micro_model_cfg, micro_world):
    runs = {}
    for amp in (None, "bf16"):
        cfg = make_cfg(tmp_path / str(amp), micro_model_cfg, micro_world, max_steps=3, amp=amp)
        make_runner(cfg).train()
        rows = [json.loads(line) for line in (tmp_path / str(amp) / "run" / "log.jsonl").read_text().splitlines()]
        runs[amp] = [row["loss"] for row in rows if row["split"] == "train"]
    assert len(runs["bf16"]) == 3 and runs["bf16"] != runs[None]
    for mixed, full in zip(runs["bf16"], runs[None]):
        assert abs(mixed - full) <= 2e-2 * full


@pytest.mark.parametrize("on_nan, message, kept, steps_logged", [
    ("stop", r"step 2: the loss or the gradient norm is not finite \(samples train_", ["step_1"], 1),
    # Skipped steps leave the weights as they were: their checkpoints hold the last good weights.
    ("skip", r"step 5: .* not finite \(samples .*\) for 4 steps in a row", ["step_3", "step_4"], 4)])
def test_a_diverging_run_stops_with_its_last_good_checkpoint(on_nan, message, kept, steps_logged, tmp_path,
                                                             micro_model_cfg, micro_world):
    from xllm.common.checkpoint import load_weights
    from xllm.runners.runner import NonFiniteError

    cfg = make_cfg(tmp_path, micro_model_cfg, micro_world, max_steps=10, lr=1e30, warmup_steps=0, save_interval=1,
                   keep_last=2, on_nan=on_nan, max_nan_skips=3, grad_clip=None)
    runner = make_runner(cfg)
    with pytest.raises(NonFiniteError, match=message):
        runner.train()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints == kept  # nothing non-finite was written
    load_weights(make_runner(cfg).model, tmp_path / "run")  # loads, and every tensor in it is finite

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["split"] == "train"]
    assert len(train) == steps_logged and train[0]["loss"] is not None
    assert all(row["loss"] is None for row in train[1:])  # the non-finite losses of skipped steps, as null


def test_a_checkpoint_holding_nan_is_refused(tmp_path, micro_model_cfg):
    from safetensors.torch import save_file

    from xllm.common.checkpoint import CheckpointError, load_weights

    model = build_model(load_config_model(micro_model_cfg))
    save_file({"adapters.image.bias": torch.full_like(model.adapters.image.bias, float("nan"))},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="1 tensors hold NaN or infinite values \\(adapters.image.bias\\)"):
        load_weights(model, tmp_path / "bad.safetensors")


def load_config_model(model_cfg):
    from xllm.models.config import resolve_model

    return resolve_model(model_cfg)


def test_resume_cuts_the_log_back_and_refuses_another_model_config(tmp_path, micro_model_cfg, micro_world):
    cfg = make_cfg(tmp_path, micro_model_cfg, micro_world, max_steps=4, save_interval=2, keep_last=3)
    make_runner(cfg).train()
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "split": "train", "lo')  # a line cut by a kill
    resumed = make_runner(cfg)
    resumed.resume(tmp_path / "run" / "checkpoints" / "step_2")
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 2  # what the stopped run wrote after step 2 is gone
    resumed.train()
    train_steps = [row["step"] for row in map(json.loads, log.read_text().splitlines()) if row["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]  # each step once
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "manifest.json").read_text())
    assert manifest["model_config"]["trainable"] == ["interfaces.image", "adapters.image"]
    assert len(manifest["model_config_sha256"]) == 64 and manifest["xllm_version"]
    image = {**micro_model_cfg["modalities"]["image"],
             "interface": {**micro_model_cfg["modalities"]["image"]["interface"], "dropout": 0.3}}
    other = make_cfg(tmp_path, {**micro_model_cfg, "modalities": {"image": image}}, micro_world, max_steps=4)
    with pytest.raises(ValueError, match=r"written by another model config \(1 keys differ\): "
                                         r"model.modalities.image.interface.dropout: 0.0 in the checkpoint, 0.3 now"):
        make_runner(other).resume(tmp_path / "run" / "checkpoints" / "step_2")
    checkpointing = make_cfg(tmp_path, {**micro_model_cfg, "activation_checkpointing": ["llm"]}, micro_world,
                             max_steps=4)
    make_runner(checkpointing).resume(tmp_path / "run" / "checkpoints" / "step_2")  # memory options may change


def test_an_unwritable_output_folder_and_a_missing_local_llm_are_named(tmp_path, micro_model_cfg):
    from xllm.common.paths import ensure_writable, looks_local
    from xllm.models.config import resolve_model

    blocker = tmp_path / "taken"
    blocker.write_text("a file where the run folder should be")
    with pytest.raises(PermissionError, match=f"run.output_dir: cannot write to {blocker}"):
        ensure_writable(blocker, "run.output_dir")
    assert ensure_writable(tmp_path / "new" / "run", "run.output_dir").is_dir()
    assert looks_local("./models/llm") and looks_local("/data/llm") and looks_local("zoo:tiny/llm")
    assert not looks_local("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match=r"model.llm.path: the folder no/such/llm does not exist"):
        build_model(resolve_model({**micro_model_cfg, "llm": {"backend": "hf_causal", "path": "./no/such/llm"}}))


def test_keep_best_keeps_the_lowest_validation_loss_beside_the_last(tmp_path, micro_model_cfg, micro_world):
    from xllm.common.checkpoint import publish, staging_folder
    from xllm.runners.runner import best_checkpoint

    checkpoints = tmp_path / "checkpoints"
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None)]:
        folder = staging_folder(checkpoints / f"step_{step}")
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"val_loss": loss}))
        publish(checkpoints / f"step_{step}", keep_last=1, keep=best_checkpoint)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4"]  # the best and the last
    # In a run: the manifests record each checkpoint's validation loss.
    cfg = make_cfg(tmp_path, micro_model_cfg, micro_world, max_steps=3, save_interval=1, val_interval=1,
                   keep_last=1, keep_best=True, val_max_batches=1)
    make_runner(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = {row["step"]: row["loss"] for row in rows if row["split"] == "val"}
    best = min(val, key=val.get)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == sorted({f"step_{best}", "step_3"})
    manifest = json.loads((tmp_path / "run" / "checkpoints" / f"step_{best}" / "manifest.json").read_text())
    assert manifest["val_loss"] == val[best]
