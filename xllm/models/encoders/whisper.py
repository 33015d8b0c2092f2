"""Speech encoder: the encoder half of Whisper (transformers' ``WhisperEncoder``).

Whisper was trained only on 30 s windows (3000 log-mel frames) zero-padded at the end, and transformers'
encoder refuses any other length. Each utterance is therefore padded to the full window, as Whisper saw it
in training, run through the encoder unchanged, and the output is trimmed to the frames that cover real
speech: ceil(frames / 2), the second convolution having stride 2. Running on the padded window keeps the
pretrained behaviour (cutting the window short would shift every frame's attention context); trimming
keeps downstream modules (CIF, C-Former) from seeing the padding as speech.

The padding is the log-mel of digital silence, as ``WhisperFeatureExtractor`` produces when it pads the
waveform: Whisper's features are clipped 80 dB (2.0 after its scaling) below the utterance's loudest bin,
so silence is ``max(row max - 2, -1.5)``, -1.5 being log10 of the mel floor rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from xllm.common.checkpoint import load_state, read_weights, weights_elsewhere
from xllm.common.config import path_field
from xllm.models.registry import register_encoder
from xllm.models.sources import model_folder

# Whisper's feature scaling maps the log10 mel floor (1e-10) to (-10 + 4) / 4.
SILENCE_FLOOR = -1.5
# The encoder's weights under each checkpoint layout: WhisperForConditionalGeneration, WhisperModel, encoder alone.
ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")


def tiny_whisper_config(**overrides) -> WhisperConfig:
    """A Whisper small enough for tests: d_model 64, 2 encoder layers, the real 80 mels and 30 s window."""
    sizes = dict(
        d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, num_mel_bins=80,
        vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    return WhisperConfig(**{**sizes, **overrides})


def load_whisper_encoder(folder: str | Path) -> WhisperEncoder:
    """The encoder of any Whisper checkpoint folder (full model, ``WhisperModel`` or encoder only).

    ``WhisperEncoder.from_pretrained`` on a full-model folder silently leaves the weights random (the key
    prefixes do not match), so the encoder's tensors are picked out of the state dict by prefix instead,
    and every one of them must be found.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"Whisper folder {folder} has no config.json")
    encoder = WhisperEncoder(WhisperConfig.from_pretrained(folder))
    if weights_elsewhere(folder):
        return encoder.eval()
    state = read_weights(folder).tensors
    wanted = encoder.state_dict().keys()
    for prefix in ENCODER_PREFIXES:
        if all(prefix + key in state for key in wanted):
            load_state(encoder, {key: state[prefix + key] for key in wanted}, f"Whisper folder {folder}")
            return encoder.eval()
    missing = sorted(key for key in wanted if not any(p + key in state for p in ENCODER_PREFIXES))
    raise ValueError(f"Whisper checkpoint in {folder} lacks encoder weights, e.g. {missing[:5]}")


@register_encoder("whisper")
class WhisperSpeechEncoder(nn.Module):
    @dataclass
    class Config:
        path: str | None = path_field("model", default=None)  # a Whisper checkpoint folder; None builds a random one of the sizes below
        d_model: int = 64
        encoder_layers: int = 2
        encoder_attention_heads: int = 4
        encoder_ffn_dim: int = 128
        num_mel_bins: int = 80

    def __init__(self, encoder: WhisperEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.output_dim = encoder.config.d_model
        self.window_frames = encoder.config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]

    @classmethod
    def build(cls, cfg: "WhisperSpeechEncoder.Config") -> "WhisperSpeechEncoder":
        if cfg.path:
            return cls(load_whisper_encoder(model_folder(cfg.path, "encoder.path")))
        config = tiny_whisper_config(
            d_model=cfg.d_model, encoder_layers=cfg.encoder_layers, encoder_attention_heads=cfg.encoder_attention_heads,
            encoder_ffn_dim=cfg.encoder_ffn_dim, num_mel_bins=cfg.num_mel_bins,
        )
        return cls(WhisperEncoder(config))

    def dummy_input(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Two frames of silence."""
        return {"features": torch.full((1, self.encoder.config.num_mel_bins, 2), SILENCE_FLOOR, device=device),
                "lengths": torch.full((1,), 2, dtype=torch.long, device=device)}

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel [B, n_mels, T] with real lengths [B] -> (hidden [B, ceil(max length / 2), D], mask, True = real).

        Without ``lengths`` every row is T frames long: the batch collation stacks utterances of equal length
        (one alone, say) into a plain tensor.
        """
        if features.dim() != 3 or features.shape[1] != self.encoder.config.num_mel_bins:
            n_mels = self.encoder.config.num_mel_bins
            raise ValueError(f"expected log-mel [B, {n_mels}, T], got {tuple(features.shape)}")
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[2], device=features.device)
        if int(lengths.max()) > self.window_frames:
            raise ValueError(f"an utterance has {int(lengths.max())} frames, more than Whisper's window of "
                             f"{self.window_frames}; trim or split it first (AudioProcessor max_seconds)")
        hidden = self.encoder(self.pad_to_window(features, lengths)).last_hidden_state
        out_lengths = (lengths + 1) // 2
        keep = int(out_lengths.max())
        mask = torch.arange(keep, device=features.device)[None, :] < out_lengths[:, None].to(features.device)
        return hidden[:, :keep] * mask[..., None], mask

    def pad_to_window(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, window] with each row's frames past its length set to Whisper's silence."""
        features = features[:, :, : self.window_frames]
        frames = torch.arange(features.shape[2], device=features.device)
        real = frames[None, :] < lengths[:, None].to(features.device)
        row_max = features.masked_fill(~real[:, None, :], float("-inf")).amax(dim=(1, 2))
        silence = (row_max - 2.0).clamp_min(SILENCE_FLOOR)
        padded = silence[:, None, None].expand(-1, features.shape[1], self.window_frames).clone()
        padded[:, :, : features.shape[2]] = torch.where(real[:, None, :], features, padded[:, :, : features.shape[2]])
        return padded
