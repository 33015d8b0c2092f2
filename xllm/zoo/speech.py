"""The tiny tier's speech encoder: a small Whisper encoder pre-trained with CTC on the world's speech.

A real speech encoder arrives knowing how speech sounds; this one learns it from the world's spoken captions
(the training voices only: the held-out voice stays unheard) with a CTC head over the transcripts'
characters, which is discarded afterwards. The window is shortened from Whisper's 30 s to
``window_seconds``, long enough for the longest caption, because every utterance is padded to the full
window and the padding would otherwise dominate the cost.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from xllm.datasets.builders.asr import read_manifest
from xllm.world.speech_corpus import WorldSpeechSpec, ensure_corpus, manifest_for
from xllm.eval.asr_metrics import cer
from xllm.models.encoders.whisper import WhisperSpeechEncoder, tiny_whisper_config
from xllm.processors.audio import AudioProcessor
from xllm.processors.collator import collate_media
from xllm.zoo.loop import Schedule, train

log = logging.getLogger(__name__)
FRAMES_PER_SECOND = 50  # encoder outputs: 100 log-mel frames per second, halved by the second convolution


@dataclass(frozen=True)
class TinySpeechEncoderRecipe:
    seed: int = 0
    corpus: WorldSpeechSpec = field(default_factory=WorldSpeechSpec)
    window_seconds: int = 15
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20


def _features(recipe: TinySpeechEncoderRecipe, split: str) -> tuple[list[torch.Tensor], list[str]]:
    root = ensure_corpus(recipe.corpus)
    manifest, prefix = manifest_for(root, split)
    records = [r for r in read_manifest(manifest) if r.utt_id.startswith(prefix)]
    processor = AudioProcessor(max_seconds=recipe.window_seconds)
    # Half precision halves the memory of the whole corpus's features kept for the run.
    return [processor(r.audio, utt_id=r.utt_id).half() for r in records], [r.text for r in records]


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor, alphabet: list[str]) -> list[str]:
    """Best path: most likely label per frame, repeats merged, blanks (index 0) removed."""
    return ["".join(alphabet[label - 1] for label in torch.unique_consecutive(row[:length]).tolist() if label)
            for row, length in zip(log_probs.argmax(-1), lengths.tolist())]


def build_speech_encoder(folder: Path, recipe: TinySpeechEncoderRecipe = TinySpeechEncoderRecipe()) -> None:
    torch.manual_seed(recipe.seed)
    features, texts = _features(recipe, "train")
    alphabet = sorted({ch for text in texts for ch in text})
    index = {ch: i + 1 for i, ch in enumerate(alphabet)}  # 0 is CTC's blank
    encoder = WhisperSpeechEncoder(WhisperEncoder(tiny_whisper_config(
        d_model=recipe.d_model, encoder_layers=recipe.num_layers, encoder_attention_heads=recipe.num_heads,
        encoder_ffn_dim=recipe.ffn_dim, max_source_positions=recipe.window_seconds * FRAMES_PER_SECOND)))
    head = nn.Linear(recipe.d_model, len(alphabet) + 1)
    rng = random.Random(f"speech_encoder/{recipe.seed}")

    def step_loss(step: int) -> torch.Tensor:
        batch = rng.sample(range(len(features)), recipe.batch_size)
        inputs = collate_media([features[i].float() for i in batch])
        targets = [torch.tensor([index[ch] for ch in texts[i]]) for i in batch]
        hidden, mask = encoder(**inputs) if isinstance(inputs, dict) else encoder(inputs)
        log_probs = head(hidden).log_softmax(-1)
        return F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets), mask.sum(1),
                          torch.tensor([len(t) for t in targets]), zero_infinity=True)

    train("tiny speech encoder (CTC)", [encoder, head], recipe.steps, Schedule(recipe.lr, recipe.warmup), step_loss,
          log_every=20, weight_decay=0.01)
    log.info("tiny speech encoder: greedy CTC CER on the validation scenes %.3f", _validation_cer(encoder, head, recipe,
                                                                                                  alphabet))
    encoder.encoder.save_pretrained(folder)


@torch.no_grad()
def _validation_cer(encoder: WhisperSpeechEncoder, head: nn.Linear, recipe: TinySpeechEncoderRecipe,
                    alphabet: list[str]) -> float:
    features, texts = _features(recipe, "val")
    hypotheses = []
    for start in range(0, len(features), recipe.batch_size):
        inputs = collate_media([f.float() for f in features[start:start + recipe.batch_size]])
        hidden, mask = encoder(**inputs) if isinstance(inputs, dict) else encoder(inputs)
        hypotheses += ctc_greedy(head(hidden).log_softmax(-1), mask.sum(1), alphabet)
    return cer(texts, hypotheses)[0]
