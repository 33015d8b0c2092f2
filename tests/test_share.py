"""Sharing a trained model: ``XLLM.save_pretrained`` / ``XLLM.from_pretrained``, ``load_model`` on the folder, the
model card, the export of a run (``python -m xllm.export``), and the errors of folders that do not fit."""

import json
import shutil

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from xllm.common.checkpoint import CheckpointError, unique_tensors
from xllm.common.config import save_config
from xllm.export import main as export
from xllm.models import XLLM, load_model, load_model_and_preprocess
from xllm.models.builder import build_model
from xllm.models.config import resolve_model
from xllm.models.lora import lora_layers
from xllm.runners.parallel import trainable_state

SPAN = "<Image><ImageHere></Image>"
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
CARD = {"title": "micro captioner",
        "stages": [{"stage": "stage2_image", "trains": "interfaces.image", "steps": 40}],
        "datasets": {"world_caption": "synthetic world scenes"}, "figures": {"eval": {"world_caption": {"cider": 1.25}}}}


def trained(cfg: dict, seed: int = 0) -> XLLM:
    """The model of ``cfg`` with its trainable weights moved off their initial values, as training would."""
    torch.manual_seed(seed)
    model = build_model(resolve_model(cfg))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model


def batch_inputs() -> dict:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"image": images, "prompt": [f"{SPAN} Describe the image.", f"{SPAN} What is it?"],
            "answer": ["a red circle.", "two squares."]}


@torch.no_grad()
def outputs(model: XLLM) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """The loss and logits on a batch, and greedy token ids of eight new tokens per prompt."""
    samples = batch_inputs()
    loss = model(model.make_batch(samples, with_answers=True)).loss
    batch = model.make_batch({k: samples[k] for k in ("image", "prompt")}, with_answers=False)
    inputs = model.splice(batch, model.encode(batch)[0])
    logits = model.llm(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask).logits
    ids = model.llm.generate(inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask, 8, min_new_tokens=8)
    return loss, logits, ids


def assert_same_outputs(model: XLLM, loaded: XLLM) -> None:
    loss, logits, ids = outputs(model)
    loaded_loss, loaded_logits, loaded_ids = outputs(loaded)
    assert torch.equal(loaded_loss, loss) and torch.equal(loaded_logits, logits)
    assert loaded_ids == ids and all(len(row) == 8 for row in ids)


@pytest.fixture(scope="module")
def model(micro_model_cfg, one_thread) -> XLLM:
    return trained(micro_model_cfg)


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("shared") / "micro", card=CARD)


def test_a_saved_model_loads_back_with_the_same_weights_and_answers(model, folder, micro_model_cfg):
    saved = load_file(str(folder / "model.safetensors"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(saved) and not any(key.startswith(("llm.", "encoders.")) for key in saved)
    config = json.loads((folder / "xllm_config.json").read_text())
    assert config["model"]["llm"]["path"] == micro_model_cfg["llm"]["path"]  # named as given, not copied
    assert not config["include_frozen"] and config["model"]["checkpoint"] is None
    loaded = XLLM.from_pretrained(folder)
    for name in trainable:
        assert torch.equal(loaded.get_parameter(name), model.get_parameter(name)), name
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    assert_same_outputs(model, loaded)
    assert loaded.generate({"image": batch_inputs()["image"][:1], "prompt": [f"{SPAN} Describe."]},
                           max_new_tokens=6) == model.generate(
        {"image": batch_inputs()["image"][:1], "prompt": [f"{SPAN} Describe."]}, max_new_tokens=6)


def test_a_relative_source_path_is_saved_absolute(micro_model_cfg, micro_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(micro_zoo["llm"].parent)
    model = trained({**micro_model_cfg, "llm": {**micro_model_cfg["llm"], "path": micro_zoo["llm"].name}})
    saved = model.save_pretrained(tmp_path / "shared")
    config = json.loads((saved / "xllm_config.json").read_text())["model"]
    assert config["llm"]["path"] == str(micro_zoo["llm"].resolve())


def test_with_its_frozen_parts_the_folder_loads_without_their_sources(micro_model_cfg, micro_zoo, tmp_path):
    sources = tmp_path / "sources"
    for name in ("llm", "image_encoder"):
        shutil.copytree(micro_zoo[name], sources / name)
    cfg = {**micro_model_cfg, "llm": {**micro_model_cfg["llm"], "path": str(sources / "llm")},
           "modalities": {"image": {**micro_model_cfg["modalities"]["image"],
                                    "encoder": {"name": "blip2_vision", "path": str(sources / "image_encoder")}}}}
    model = trained(cfg)
    folder = model.save_pretrained(tmp_path / "shared", include_frozen=True)
    shutil.rmtree(sources)
    assert set(load_file(str(folder / "model.safetensors"))) == set(unique_tensors(model.state_dict()))
    bundled = folder / "frozen" / "llm.path"
    assert (bundled / "config.json").is_file() and not list(bundled.glob("*.safetensors"))
    loaded = XLLM.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert_same_outputs(model, loaded)


def test_load_model_and_preprocess_reads_a_folder(model, folder):
    loaded, processors, text = load_model_and_preprocess(str(folder))
    assert set(processors) == {"image"} and set(text) == {"train", "eval"}
    assert torch.equal(loaded.get_parameter("adapters.image.weight"), model.get_parameter("adapters.image.weight"))
    assert not loaded.interfaces["image"].training
    assert load_model(folder, is_eval=False).interfaces["image"].training  # a Path works too
    bf16 = XLLM.from_pretrained(folder, dtype=torch.bfloat16, llm={"max_prompt_length": 64})
    assert bf16.llm.max_prompt_length == 64 and bf16.get_parameter("adapters.image.weight").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="the folder holds its trained weights"):
        load_model(folder, checkpoint=folder / "model.safetensors")


def test_the_card_records_the_stages_datasets_and_figures(folder):
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "xllm" and {"xllm", "image", "hf_causal"} <= set(meta["tags"])
    assert "base_model" not in meta  # the micro sources are local folders, not Hub models
    assert "# micro captioner" in body
    assert "| stage2_image | interfaces.image | 40 |" in body
    assert "**world_caption**: synthetic world scenes" in body
    assert "| eval / world_caption / cider | 1.25 |" in body
    assert json.loads((folder / "xllm_config.json").read_text())["card"] == CARD


def test_saving_again_replaces_the_folder_but_never_other_files(model, folder, tmp_path):
    again = model.save_pretrained(folder, card={"title": "again"})
    assert "# again" in (again / "README.md").read_text() and not folder.with_name(folder.name + ".tmp").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an xllm model folder: it is not replaced"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"card keys \['stage'\] are unknown"):
        model.save_pretrained(tmp_path / "new", card={"stage": "typo"})


def broken(folder, tmp_path, damage):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def rewrite_weights(change):
    def damage(copy):
        weights = load_file(str(copy / "model.safetensors"))
        change(weights)
        save_file(weights, str(copy / "model.safetensors"))
    return damage


@pytest.mark.parametrize("damage, error, message", [
    (lambda c: (c / "xllm_config.json").unlink(), FileNotFoundError,
     r"broken is not an xllm model folder: it has no xllm_config.json"),
    (lambda c: (c / "xllm_config.json").write_text("{not json"), ValueError, r"xllm_config.json is not readable JSON"),
    (lambda c: (c / "xllm_config.json").write_text('{"format": 9, "model": {}}'), ValueError,
     r"xllm_config.json is not an xllm model config of format 1 \(format 9\)"),
    (lambda c: (c / "model.safetensors").unlink(), FileNotFoundError, r"broken: the weights file model.safetensors"),
    (lambda c: (c / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"), CheckpointError,
     r"broken/model.safetensors: not a readable safetensors file"),
    (rewrite_weights(lambda w: w.pop("adapters.image.weight")), CheckpointError,
     r"(?s)broken/model.safetensors: the weights do not fit XLLM .*missing key adapters.image.weight"),
    (rewrite_weights(lambda w: w.update({"adapters.image.weight": torch.zeros(3, 3)})), CheckpointError,
     r"adapters.image.weight in model.safetensors has shape \[3, 3\], the model needs \[32, 32\]"),
    (rewrite_weights(lambda w: w.update({"adapters.speech.weight": torch.zeros(3)})), CheckpointError,
     r"unexpected key adapters.speech.weight in model.safetensors"),
])
def test_a_folder_that_does_not_fit_is_an_error_naming_the_file(folder, tmp_path, damage, error, message):
    with pytest.raises(error, match=message):
        XLLM.from_pretrained(broken(folder, tmp_path, damage))


@pytest.fixture(scope="module")
def lora_run(micro_model_cfg, tmp_path_factory, one_thread):
    """Two run folders as train.py leaves them: stage A trains the interface, stage B (starting from A) adds LoRA
    beside it; and an evaluation run of B with its report."""
    root = tmp_path_factory.mktemp("runs")
    stage_a = trained(micro_model_cfg, seed=1)
    write_run(root / "stage_a", stage_a, micro_model_cfg, steps=5)
    cfg_b = {**micro_model_cfg, "llm": {**micro_model_cfg["llm"], "lora": LORA}, "trainable": ["llm.*lora_*"],
             "checkpoint": [str(root / "stage_a")]}
    stage_b = trained(cfg_b, seed=2)
    write_run(root / "stage_b", stage_b, cfg_b, steps=3)
    evaluation = root / "eval_b"
    save_config(OmegaConf.create({"model": {"checkpoint": str(root / "stage_b")}, "run": {"eval_split": "test"}}),
                evaluation)
    (evaluation / "report.json").write_text(json.dumps({"world_caption": {"cider": 0.75, "kind": 0.5}}))
    return root, stage_b


def write_run(run, model, cfg, steps):
    step = run / "checkpoints" / f"step_{steps}"
    step.mkdir(parents=True)
    save_file(trainable_state(model), str(step / "model.safetensors"))
    (step / "manifest.json").write_text(json.dumps({"step": steps, "val_loss": 1.5}))
    (run / "log.jsonl").write_text(json.dumps({"step": steps, "split": "train", "loss": 2.25}) + "\n")
    save_config(OmegaConf.create({"model": resolve_model(cfg), "run": {"task": "llm"},
                                  "datasets": {"world_caption": {"builder": "coco_caption", "world": {"seed": 0}}}}),
                run)


def test_lora_adapters_are_saved_and_a_merged_export_answers_the_same(lora_run, tmp_path):
    root, model = lora_run
    unmerged = export(["--run", str(root / "stage_b"), "--out", str(tmp_path / "unmerged")])
    saved = load_file(str(unmerged / "model.safetensors"))
    assert {k for k in saved if ".lora_" in k} == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert any(k.startswith("interfaces.image.") for k in saved)  # stage A's weights, which stage B froze
    loaded = XLLM.from_pretrained(unmerged)
    assert len(lora_layers(loaded)) == 4
    assert_same_outputs(model, loaded)

    merged = export(["--run", str(root / "stage_b"), "--out", str(tmp_path / "merged"), "--merge-lora"])
    saved = load_file(str(merged / "model.safetensors"))
    assert not any(".lora_" in k for k in saved)
    assert "llm.model.model.layers.0.self_attn.q_proj.weight" in saved  # the merged layers, not the whole LLM
    assert "llm.model.model.layers.0.mlp.up_proj.weight" not in saved
    config = json.loads((merged / "xllm_config.json").read_text())["model"]
    assert config["llm"]["lora"] is None and config["trainable"] == []
    merged_model = XLLM.from_pretrained(merged)
    assert lora_layers(merged_model) == []
    loss, logits, ids = outputs(model)
    merged_loss, merged_logits, merged_ids = outputs(merged_model)
    assert torch.allclose(merged_logits, logits, atol=1e-5) and torch.allclose(merged_loss, loss, atol=1e-5)
    assert merged_ids == ids


def test_an_export_card_gathers_the_stages_and_the_evaluation(lora_run, tmp_path):
    root, _ = lora_run
    folder = export(["--run", str(root / "stage_b"), "--out", str(tmp_path / "out")])
    card = json.loads((folder / "xllm_config.json").read_text())["card"]
    assert card["title"] == "stage_b"
    assert [(s["stage"], s["trains"], s["steps"], s["train loss"], s["val loss"]) for s in card["stages"]] == [
        ("stage_a", "interfaces.image, adapters.image", 5, 2.25, 1.5), ("stage_b", "llm.*lora_*", 3, 2.25, 1.5)]
    assert card["datasets"] == {"world_caption": "builder coco_caption; synthetic world seed=0"}
    assert card["figures"] == {"eval_b (test split)": {"world_caption": {"cider": 0.75, "kind": 0.5}}}
    text = (folder / "README.md").read_text()
    assert "lora" in yaml.safe_load(text.split("---\n")[1])["tags"]
    assert "| eval_b (test split) / world_caption / cider | 0.75 |" in text
    with pytest.raises(FileNotFoundError, match="holds no report.json"):
        export(["--run", str(root / "stage_b"), "--out", str(tmp_path / "out2"), "--eval", str(root / "stage_a")])


def test_the_native_chatglm_with_lora_and_frozen_bf16_parts_travels_with_its_frozen_parts(micro_chatglm, micro_zoo,
                                                                                          tmp_path):
    from conftest import MICRO_QFORMER

    sources = tmp_path / "sources"
    shutil.copytree(micro_chatglm, sources / "chatglm")
    shutil.copytree(micro_zoo["image_encoder"], sources / "image_encoder")
    cfg = {"arch": "xllm", "model_type": "tiny_zh", "frozen_dtype": "bfloat16",
           "llm": {"backend": "chatglm", "path": str(sources / "chatglm"),
                   "lora": {"r": 2, "target_modules": ["query_key_value"]}},
           "modalities": {"image": {"encoder": {"name": "blip2_vision", "path": str(sources / "image_encoder")},
                                    "interface": {"name": "qformer", **MICRO_QFORMER}}},
           "trainable": ["adapters.image", "llm.*lora_*"]}
    model = trained(cfg)
    folder = model.save_pretrained(tmp_path / "shared", include_frozen=True)
    shutil.rmtree(sources)
    assert (folder / "frozen" / "llm.path" / "ice_text.model").is_file()  # the tokenizer travels, the weights do not
    loaded = XLLM.from_pretrained(folder)
    state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
