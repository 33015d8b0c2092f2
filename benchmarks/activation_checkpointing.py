"""Activation memory of a stage-2 step with and without activation checkpointing, at the "small" size.

    PYTHONPATH=. python benchmarks/activation_checkpointing.py [--rounds 3]

"small": 224 px images, patch 16, ViT 8 x 384 (frozen), Q-Former 6 x 384 with 32 queries (trainable), a Llama
8 x 576 with a 49,152-word vocabulary (frozen), 48 text positions, batch 8. Activation memory is the peak of
the bytes allocated during one training step (forward and backward) minus what was allocated before it, taken
from the profiler's allocation records (``profile_memory``: every allocation and free on the CPU, in order).
The bytes autograd keeps for backward at the end of the forward (``xllm.plan.SavedBytes``) are printed beside.
Rounds alternate the two settings; the table gives the median and the spread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Blip2VisionConfig, Blip2VisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from xllm.models.adapters import LinearAdapter
from xllm.models.interfaces.qformer import QFormerInterface
from xllm.models.llm.hf_causal import HFCausalLM
from xllm.models.memory import enable_activation_checkpointing
from xllm.models.encoders.vision import VisionEncoder
from xllm.models.trainable import apply_trainable
from xllm.models.xllm import XLLM, Modality
from xllm.plan import SavedBytes

from blip2_pair import step_peak_bytes  # a sibling: the benchmarks' folder is on the path when one runs

BATCH, TEXT_TOKENS, VOCAB = 8, 48, 49_152


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over numbered words: the benchmark needs ids, not language."""
    words = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def small_model() -> XLLM:
    torch.manual_seed(0)
    vision = VisionEncoder(Blip2VisionModel(Blip2VisionConfig(image_size=224, patch_size=16, hidden_size=384,
                                                              num_hidden_layers=8, num_attention_heads=6,
                                                              intermediate_size=1536)))
    qformer = QFormerInterface.build(QFormerInterface.Config(num_query_tokens=32, hidden_size=384,
                                                             num_hidden_layers=6, num_attention_heads=6,
                                                             intermediate_size=1536), input_dim=384)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=576, num_hidden_layers=8,
                                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536))
    adapter = LinearAdapter.build(LinearAdapter.Config(), input_dim=384, output_dim=576)
    model = XLLM(HFCausalLM(llama, tokenizer()), {"image": Modality(vision, qformer, adapter)})
    model.requires_grad_(False)
    apply_trainable(model, ["interfaces.image", "adapters.image"])
    return model


def batch_for(model: XLLM):
    words = " ".join(f"w{i}" for i in range(TEXT_TOKENS // 2))
    images = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    samples = [{"id": str(i), "image": images[i], "prompt": f"<Image><ImageHere></Image> {words}", "answer": words}
               for i in range(BATCH)]
    return model.collator()(samples)


def step(model: XLLM, batch) -> None:
    model(batch).loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    plain = small_model().train()
    checkpointing = small_model()
    enable_activation_checkpointing(checkpointing, ["llm", "interfaces.image"])
    checkpointing.train()
    batch = batch_for(plain)
    results: dict[str, dict[str, list[float]]] = {"plain": {}, "checkpointed": {}}
    for _ in range(args.rounds):
        for name, model in (("plain", plain), ("checkpointed", checkpointing)):
            started = time.perf_counter()
            step(model, batch)
            seconds = time.perf_counter() - started
            saved = SavedBytes(model).measure(lambda: model(batch))
            row = results[name]
            row.setdefault("peak", []).append(step_peak_bytes(lambda: step(model, batch)) / 2 ** 20)
            row.setdefault("saved", []).append(saved / 2 ** 20)
            row.setdefault("seconds", []).append(seconds)
    print(f"stage-2 step, small size, batch {BATCH}, {args.rounds} rounds (median, spread)")
    print(f"{'setting':<14}{'activation peak MiB':>26}{'kept for backward MiB':>26}{'step s':>20}")
    for name, row in results.items():
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in row.values()]
        print(f"{name:<14}{cells[0]:>26}{cells[1]:>26}{cells[2]:>20}")
    cut = 1 - statistics.median(results["checkpointed"]["peak"]) / statistics.median(results["plain"]["peak"])
    print(f"activation checkpointing lowers the activation peak by {100 * cut:.0f} %")


if __name__ == "__main__":
    main()
