import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import WhisperForConditionalGeneration, WhisperModel

from xllm.models.registry import ENCODERS
from xllm.models.encoders.whisper import WhisperSpeechEncoder, load_whisper_encoder, tiny_whisper_config
from xllm.processors.audio import log_mel
from xllm.processors.collator import collate_media


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return WhisperSpeechEncoder.build(WhisperSpeechEncoder.Config()).eval()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (40000, 16160)]  # 250 and 101 frames
    padded = collate_media([log_mel(w) for w in waves])
    return padded["features"], padded["lengths"]


def test_registered():
    assert ENCODERS.get("whisper") is WhisperSpeechEncoder


def test_output_length_and_mask(encoder, batch):
    features, lengths = batch
    assert lengths.tolist() == [250, 101]
    with torch.no_grad():
        hidden, mask = encoder(features, lengths)
    assert hidden.shape == (2, 125, 64)
    assert mask.sum(1).tolist() == [125, 51]  # ceil(frames / 2)
    assert mask[1, :51].all() and not mask[1, 51:].any()
    assert (hidden[1, 51:] == 0).all()


def test_real_frames_match_full_window_then_slice(encoder, batch):
    features, lengths = batch
    with torch.no_grad():
        hidden, mask = encoder(features, lengths)
        for row, length in enumerate(lengths.tolist()):
            real = features[row, :, :length]
            silence = max(real.max().item() - 2.0, -1.5)
            window = torch.full((1, 80, 3000), silence)
            window[0, :, :length] = real
            full = encoder.encoder(window).last_hidden_state[0]
            keep = (length + 1) // 2
            torch.testing.assert_close(hidden[row, :keep], full[:keep], atol=1e-5, rtol=1e-5)
    # Each row is independent of the others' lengths; a stacked batch without lengths is all real frames.
    with torch.no_grad():
        alone, _ = encoder(features[1:, :, :101], lengths[1:])
        stacked, stacked_mask = encoder(features[1:, :, :101])
    torch.testing.assert_close(alone[0], hidden[1, :51], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stacked[0], hidden[1, :51], atol=1e-5, rtol=1e-5)
    assert stacked_mask.all() and stacked_mask.shape == (1, 51)


def test_padding_is_whisper_silence(encoder):
    rng = np.random.default_rng(1)
    wave = (0.2 * rng.standard_normal(24000)).astype(np.float32)
    features = log_mel(wave)
    reference = log_mel(wave, pad_to_seconds=30)
    padded = encoder.pad_to_window(features[None], torch.tensor([features.shape[1]]))[0]
    # Only the frames whose 25 ms window straddles the end of the audio differ (reflected vs zero samples).
    edge = features.shape[1]
    torch.testing.assert_close(padded[:, : edge - 2], reference[:, : edge - 2])
    torch.testing.assert_close(padded[:, edge + 2 :], reference[:, edge + 2 :])


def test_too_long_is_an_error(encoder):
    with pytest.raises(ValueError, match="3001 frames"):
        encoder(torch.zeros(1, 80, 3001), torch.tensor([3001]))


@pytest.mark.parametrize("model_class", [WhisperForConditionalGeneration, WhisperModel, None])
def test_loads_encoder_from_any_checkpoint_layout(tmp_path, model_class):
    torch.manual_seed(2)
    config = tiny_whisper_config()
    model = model_class(config) if model_class else WhisperSpeechEncoder.build(WhisperSpeechEncoder.Config()).encoder
    model.save_pretrained(tmp_path)
    source = model.get_encoder() if model_class else model
    loaded = WhisperSpeechEncoder.build(WhisperSpeechEncoder.Config(path=str(tmp_path))).encoder
    for (name, expected), (_, actual) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, actual), name


def test_missing_encoder_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(tiny_whisper_config().to_json_string())
    save_file({"something.else": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks encoder weights"):
        load_whisper_encoder(tmp_path)
