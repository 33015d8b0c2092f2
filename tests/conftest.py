from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Micro versions of the tiny tier: the same builders, a few steps, so tests exercise the real loading code
# in seconds. Training quality is measured by the real configs, never by tests.
MICRO_LLM = dict(steps=2, tokenizer_documents=2000, hidden_size=32, num_layers=2, num_heads=2,
                 intermediate_size=64, batch_size=4)
MICRO_ENCODER = dict(steps=1, image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, batch_size=4)
MICRO_CHATGLM = dict(steps=2, batch_size=4, hidden_size=32, num_layers=2, num_heads=2, inner_hidden_size=64,
                     tokenizer_documents=2000)
MICRO_QFORMER = dict(num_query_tokens=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, cross_attention_frequency=1, dropout=0.0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the machine's cores are shared, and more threads make micro models slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's read-only outside material (``../shared``); tests that need it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared oracles and assets are not on this machine")
    return SHARED


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> dict[str, Path]:
    """Folders of a micro LLM and a micro image encoder, built by the zoo's own builders."""
    from xllm.zoo.image_encoder import TinyEncoderRecipe, build_image_encoder
    from xllm.zoo.tiny_llm import TinyLLMRecipe, build_llm

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    build_llm(root / "llm", TinyLLMRecipe(**MICRO_LLM))
    build_image_encoder(root / "image_encoder", TinyEncoderRecipe(**MICRO_ENCODER))
    return {"llm": root / "llm", "image_encoder": root / "image_encoder"}


@pytest.fixture(scope="session")
def micro_chatglm(tmp_path_factory) -> Path:
    """A micro ChatGLM checkpoint folder in the original layout, built by the zoo's own builder."""
    from xllm.zoo.tiny_chatglm import TinyChatGLMRecipe, build_chatglm_llm

    folder = tmp_path_factory.mktemp("zoo") / "chatglm_llm"
    build_chatglm_llm(folder, TinyChatGLMRecipe(**MICRO_CHATGLM))
    return folder


@pytest.fixture(scope="session")
def micro_text_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer folder for the Q-Former's text branch, built by the zoo's own builder."""
    from xllm.zoo.text_tokenizer import TinyTextTokenizerRecipe, build_text_tokenizer

    folder = tmp_path_factory.mktemp("text_tokenizer")
    build_text_tokenizer(folder, TinyTextTokenizerRecipe(documents=300))
    return folder


@pytest.fixture(scope="session")
def micro_model_cfg(micro_zoo) -> dict:
    """A ``model`` config section for the micro image model (explicit folders: no zoo build is triggered)."""
    return {
        "arch": "xllm", "model_type": "tiny",
        "llm": {"backend": "hf_causal", "path": str(micro_zoo["llm"])},
        "modalities": {"image": {"encoder": {"name": "blip2_vision", "path": str(micro_zoo["image_encoder"])},
                                 "interface": {"name": "qformer", **MICRO_QFORMER}}},
        "trainable": ["interfaces.image", "adapters.image"],
    }


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> dict:
    """A ``world`` block and its storage folder for a few dozen 32-pixel world images."""
    storage = tmp_path_factory.mktemp("world")
    return {"storage": str(storage), "world": {"seed": 0, "num_train": 24, "num_val": 8, "num_test": 8,
                                                "image_size": 32, "shard_size": 10}, "image_size": 32}


@pytest.fixture(scope="session")
def stage1_cfg(micro_model_cfg, micro_text_tokenizer) -> dict:
    """A ``model`` config section for stage 1 image: the Q-Former with its text branch, no LLM."""
    image = {**micro_model_cfg["modalities"]["image"],
             "interface": {"name": "qformer_text", "tokenizer": str(micro_text_tokenizer), "embed_dim": 16,
                           **MICRO_QFORMER}}
    return {**micro_model_cfg, "modalities": {"image": image}, "trainable": ["interfaces.image"],
            "llm": {"backend": "none", "path": ""}}  # stage 1 reads no LLM
