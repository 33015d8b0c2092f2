"""Greedy decoding speed and memory of the native ChatGLM: KV cache vs full recompute.

A small random model (the real architecture at toy width) decodes 256 tokens in each mode. Each mode runs in
a fresh process so that its memory figure is its own: the peak resident set size (``ru_maxrss``) minus the
resident set size just before generating, i.e. what decoding itself added at its peak.

    python -m benchmarks.chatglm_generate [--new-tokens 256] [--threads 1]    (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from xllm.models.llm.chatglm import ChatGLMForConditionalGeneration

CONFIG = {
    "vocab_size": 8192,
    "hidden_size": 128,
    "num_layers": 4,
    "num_attention_heads": 4,
    "inner_hidden_size": 512,
    "bos_token_id": 8004,
    "eos_token_id": 8005,
    "mask_token_id": 8000,
    "gmask_token_id": 8001,
    "pad_token_id": 3,
}
PROMPT_TOKENS = 16
MODES = {"kv cache": True, "full recompute": False}
REPO = Path(__file__).resolve().parents[1]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_mode(use_cache: bool, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration.from_config(CONFIG, device="cpu").eval()
    prompt = torch.randint(10, 8000, (1, PROMPT_TOKENS))
    input_ids = torch.cat((prompt, torch.tensor([[CONFIG["gmask_token_id"], CONFIG["bos_token_id"]]])), dim=1)
    # eos -1 is never emitted, so every run decodes exactly new_tokens tokens
    model.generate(input_ids, 4, use_cache=use_cache, eos_token_id=-1)  # warm-up
    before = resident_bytes()
    start = time.perf_counter()
    output = model.generate(input_ids, new_tokens, use_cache=use_cache, eos_token_id=-1)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"seconds": seconds, "new_tokens": output.shape[1] - input_ids.shape[1],
            "peak_growth": max(peak - before, 0), "ids": output[0].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady)")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_mode(MODES[args.child], args.new_tokens)))
        return

    results = {}
    for mode in MODES:
        command = [sys.executable, "-m", "benchmarks.chatglm_generate", "--child", mode,
                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        child = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
        results[mode] = json.loads(child.stdout)

    c = CONFIG
    print(f"ChatGLM greedy decoding on CPU, float32, {args.threads} thread(s); random model: "
          f"hidden {c['hidden_size']}, {c['num_layers']} layers, {c['num_attention_heads']} heads, "
          f"vocab {c['vocab_size']}; "
          f"prompt {PROMPT_TOKENS + 2} tokens, {args.new_tokens} new tokens")
    print(f"{'mode':<16}{'tokens/s':>10}{'seconds':>10}{'peak RSS growth (MiB)':>24}")
    for mode, result in results.items():
        rate = result["new_tokens"] / result["seconds"]
        print(f"{mode:<16}{rate:>10.1f}{result['seconds']:>10.2f}{result['peak_growth'] / 2**20:>24.1f}")
    cached, full = results["kv cache"], results["full recompute"]
    speedup = full["seconds"] / cached["seconds"]
    print(f"speed-up of the KV cache: {speedup:.1f}x; same ids in both modes: {cached['ids'] == full['ids']}")
    print("memory: peak resident set size (ru_maxrss) minus the resident set just before generate(), "
          "each mode in a fresh process")


if __name__ == "__main__":
    main()
