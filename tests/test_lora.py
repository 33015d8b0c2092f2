"""LoRA on the LLM (``model.llm.lora``): what trains, what a run's checkpoint holds, merging, and bad configs."""

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from xllm.common.checkpoint import latest_checkpoint
from xllm.common.config import ConfigError, save_config
from xllm.config import load_config
from xllm.datasets.build import build_split
from xllm.datasets.loader import evaluation_loader, training_loader
from xllm.demo.session import load_run
from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.models.lora import lora_layers, merge_lora
from xllm.runners.runner import Runner
from xllm.tasks.base import LLMTask

SPAN = "<Image><ImageHere></Image>"
LLAMA_LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
MANIFEST = ["interfaces.image", "adapters.image", "llm.*lora_*"]


@pytest.fixture(scope="module")
def lora_cfg(micro_model_cfg) -> dict:
    return {**micro_model_cfg, "llm": {**micro_model_cfg["llm"], "lora": LLAMA_LORA}, "trainable": MANIFEST}


@pytest.fixture(scope="module")
def trained_run(lora_cfg, micro_world, tmp_path_factory, one_thread):
    """A three-step run of the micro model with LoRA, its parameters before and after, and its config."""
    root = tmp_path_factory.mktemp("lora_run")
    config = {"model": lora_cfg, "datasets": {"world": {"builder": "coco_caption", **micro_world}},
              "run": {"output_dir": str(root / "run"), "log_interval": 1, "lr": 1e-2, "warmup_steps": 1,
                      "batch_size": 4, "max_steps": 3, "seed": 0, "val_max_batches": 1}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(root / "cfg.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    collator = model.collator()
    runner = Runner(cfg.run, model, LLMTask(cfg.run),
                    training_loader(build_split(cfg.datasets, "train")["world"], collator, 4, 0),
                    evaluation_loader(build_split(cfg.datasets, "val")["world"], collator, 8))
    runner.train()
    save_config(cfg, runner.output_dir)  # as train.py does
    return cfg, model.eval(), before, runner.output_dir


def prompt_batch(model):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model.make_batch({"image": images, "prompt": [f"{SPAN} Describe the image.", f"{SPAN} What is it?"]},
                            with_answers=False)


@torch.no_grad()
def logits_and_greedy_ids(model, batch, **generation):
    inputs = model.splice(batch, model.encode(batch)[0])
    logits = model.llm(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask).logits
    ids = model.llm.generate(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask, 8, **generation)
    return logits, ids


def test_the_manifest_glob_names_the_lora_weights_beside_the_interfaces(lora_cfg):
    model = build_model(resolve_model(lora_cfg))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if name.startswith("llm.")}
    layers = 2 * 2  # q_proj and v_proj in each of the micro LLM's two layers
    assert len(lora) == 2 * layers and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert trainable - lora == {n for n, _ in model.named_parameters() if n.startswith(("interfaces.", "adapters."))}
    # the wrapped layers' own weights stay frozen under their peft names
    assert not model.get_parameter("llm.model.model.layers.0.self_attn.q_proj.base_layer.weight").requires_grad


def test_only_lora_and_interface_weights_change_in_training(trained_run):
    _, model, before, _ = trained_run
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    assert any(".lora_B." in name for name in changed)  # the updates start at zero and moved


def test_lora_dropout_runs_only_while_its_adapters_train(trained_run):
    _, model, _, _ = trained_run
    dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert len(dropouts) == 4
    model.train()
    try:
        assert all(m.training for m in dropouts)
        assert not model.llm.training and not model.llm.model.model.layers[0].self_attn.training
    finally:
        model.eval()
    assert not any(m.training for m in dropouts)


def test_the_checkpoint_holds_the_adapters_and_loads_back(trained_run):
    cfg, model, _, run = trained_run
    saved = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and any(".lora_A." in key for key in saved)
    spec = OmegaConf.to_container(cfg.model)
    reloaded = build_model(resolve_model({**spec, "checkpoint": str(run)}))
    for name, value in saved.items():
        assert torch.equal(reloaded.get_parameter(name), model.get_parameter(name)), name
    batch = prompt_batch(model)
    assert torch.equal(logits_and_greedy_ids(reloaded, batch)[0], logits_and_greedy_ids(model, batch)[0])


def test_merging_keeps_the_answers_and_drops_the_adapters(trained_run):
    cfg, model, _, run = trained_run
    batch = prompt_batch(model)
    logits, ids = logits_and_greedy_ids(model, batch, min_new_tokens=8)
    merged, _ = load_run(run)  # the run's config and checkpoint, merged for inference
    assert lora_layers(merged) == [] and not any("lora_" in name for name in merged.state_dict())
    q_proj = merged.llm.model.model.layers[0].self_attn.q_proj
    base = model.llm.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj) is torch.nn.Linear and not torch.allclose(q_proj.weight, base.weight)
    merged_logits, merged_ids = logits_and_greedy_ids(merged, batch, min_new_tokens=8)
    assert torch.allclose(merged_logits, logits, atol=1e-5)
    assert merged_ids == ids and all(len(row) == 8 for row in ids)
    unmerged, _ = load_run(run, merge=False)
    assert len(lora_layers(unmerged)) == 4


def test_lora_on_the_native_chatglm(micro_chatglm, micro_zoo):
    from conftest import MICRO_QFORMER

    cfg = {"arch": "xllm", "model_type": "tiny_zh",
           "llm": {"backend": "chatglm", "path": str(micro_chatglm),
                   "lora": {"r": 2, "target_modules": ["query_key_value"]}},
           "modalities": {"image": {"encoder": {"name": "blip2_vision", "path": str(micro_zoo["image_encoder"])},
                                    "interface": {"name": "qformer", **MICRO_QFORMER}}},
           "trainable": ["adapters.image", "llm.*lora_*"]}
    torch.manual_seed(0)
    model = build_model(resolve_model(cfg))
    assert lora_layers(model) == [f"llm.model.transformer.layers.{i}.attention.query_key_value" for i in range(2)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    train_batch = model.make_batch({"image": images, "prompt": [f"{SPAN} 描述这张图片。"] * 2,
                                    "answer": ["一个红色的圆形。", "两个图形。"]}, with_answers=True)
    model.train()
    for _ in range(2):  # two steps: lora_A only moves once lora_B is no longer zero
        optimizer.zero_grad()
        model(train_batch).loss.backward()
        optimizer.step()
    model.eval()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in changed if n.startswith("llm.")} and all(".lora_" in n for n in changed if n.startswith("llm."))
    batch = model.make_batch({"image": images, "prompt": [f"{SPAN} 描述这张图片。", f"{SPAN} 有几个图形？"]},
                             with_answers=False)
    logits, ids = logits_and_greedy_ids(model, batch)
    assert merge_lora(model) == 2 and lora_layers(model) == []
    merged_logits, merged_ids = logits_and_greedy_ids(model, batch)
    assert torch.allclose(merged_logits, logits, atol=1e-4) and merged_ids == ids
    assert all(len(row) == 8 for row in ids)


def test_an_unknown_target_module_is_named(micro_model_cfg):
    cfg = {**micro_model_cfg, "llm": {**micro_model_cfg["llm"], "lora": {"target_modules": ["q_prj"]}}}
    with pytest.raises(ValueError, match=r"model\.llm\.lora\.target_modules: 'q_prj' names no module of the LLM "
                                         r"\(LlamaForCausalLM\); its linear layers are .*q_proj.*; did you mean 'q_proj'"):
        build_model(resolve_model(cfg))


@pytest.mark.parametrize("lora, message", [
    ({"r": 0, "target_modules": ["q_proj"]}, r"model\.llm\.lora\.r' must be a positive rank, got 0"),
    ({"target_modules": []}, r"model\.llm\.lora\.target_modules' must name the LLM's modules"),
    ({"dropout": 1.0, "target_modules": ["q_proj"]}, r"model\.llm\.lora\.dropout' must be in \[0, 1\)"),
    ({"rank": 4, "target_modules": ["q_proj"]}, r"unknown config key 'model\.llm\.lora\.rank'; known keys: alpha, dropout, r"),
])
def test_a_bad_lora_block_is_a_config_error(micro_model_cfg, lora, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model({**micro_model_cfg, "llm": {**micro_model_cfg["llm"], "lora": lora}})


def test_lora_without_a_manifest_entry_warns(micro_model_cfg, caplog):
    cfg = {**micro_model_cfg, "llm": {**micro_model_cfg["llm"], "lora": {"target_modules": ["q_proj"]}}}
    model = build_model(resolve_model(cfg))
    assert len(lora_layers(model)) == 2
    assert "names none of its weights" in caplog.text
