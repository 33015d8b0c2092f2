"""Micro speech material shared by the speech tests: a spoken-world corpus, a speech encoder, model configs.

Imported by the test modules that use them (``from speech_fixtures import ...``), so pytest sees the fixtures.
"""

from pathlib import Path

import pytest
import torch
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from xllm.world.speech_corpus import WorldSpeechSpec, ensure_corpus
from xllm.models.encoders.whisper import tiny_whisper_config

MICRO_SPEECH_SPEC = dict(seed=0, num_train=24, num_val=4, zh_ratio=0.25)
MICRO_CFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_tokens=128, dropout=0.0)
MICRO_WINDOW_SECONDS = 15


@pytest.fixture(scope="session")
def micro_speech_corpus(tmp_path_factory) -> dict:
    """A ``world_speech`` dataset block over a few dozen synthesised utterances (espeak-ng)."""
    storage = tmp_path_factory.mktemp("speech")
    ensure_corpus(WorldSpeechSpec(**MICRO_SPEECH_SPEC), storage)
    return {"builder": "world_speech", "storage": str(storage), "world": dict(MICRO_SPEECH_SPEC),
            "audio": {"max_seconds": MICRO_WINDOW_SECONDS}}


@pytest.fixture(scope="session")
def micro_speech_encoder(tmp_path_factory) -> Path:
    """A random micro Whisper encoder folder with the tiny tier's shortened window."""
    folder = tmp_path_factory.mktemp("speech_encoder")
    torch.manual_seed(0)
    config = tiny_whisper_config(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                                 max_source_positions=MICRO_WINDOW_SECONDS * 50)
    WhisperEncoder(config).save_pretrained(folder)
    return folder


def speech_modality(encoder_folder: Path) -> dict:
    return {"encoder": {"name": "whisper", "path": str(encoder_folder)},
            "interface": {"name": "cformer", **MICRO_CFORMER}, "adapter": {"name": "linear"}}


@pytest.fixture(scope="session")
def micro_speech_model_cfg(micro_zoo, micro_speech_encoder) -> dict:
    """A ``model`` section for the micro speech model (explicit folders: no zoo build is triggered)."""
    return {"arch": "xllm", "model_type": "tiny_speech",
            "llm": {"backend": "hf_causal", "path": str(micro_zoo["llm"])},
            "modalities": {"speech": speech_modality(micro_speech_encoder)},
            "trainable": ["interfaces.speech", "adapters.speech"]}


@pytest.fixture(scope="session")
def micro_multimodal_model_cfg(micro_model_cfg, micro_speech_encoder) -> dict:
    """The micro image model with a speech modality beside it (the paper's multimodal ASR)."""
    modalities = {**micro_model_cfg["modalities"], "speech": speech_modality(micro_speech_encoder)}
    return {**micro_model_cfg, "modalities": modalities,
            "trainable": ["interfaces.image", "adapters.image", "interfaces.speech", "adapters.speech"]}
