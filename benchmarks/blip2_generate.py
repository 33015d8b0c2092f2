"""Batched greedy captioning: xllm's ``model.generate`` against ``Blip2ForConditionalGeneration.generate``.

    PYTHONPATH=. python benchmarks/blip2_generate.py --size small [--batch 8] [--new-tokens 40] [--rounds 5] \\
        [--threads 1]

Both models come from ``blip2_pair.py``: one random BLIP-2 (Llama text model), xllm's model converted from its
checkpoint folder, the same prompt after every image. Both decode greedily with the KV cache, a whole batch at a
time, and exactly ``--new-tokens`` tokens per caption (``min_new_tokens`` = ``max_new_tokens`` on both; xllm's own greedy
loop holds the end token back as transformers' does): a random model's end token would otherwise end captions at
random lengths. A caption is text on both sides (transformers' new ids decoded by the same tokenizer).

First the two sets of captions are compared (fp32): random weights leave near-ties between tokens that a different
order of operations may break the other way, so the table reports the share of captions and of words that agree
rather than requiring all. Then generation is timed in one process, alternating rounds (xllm, then transformers,
after one untimed call each). The table gives captions/s (median over rounds and its range), xllm / transformers
(median and range over the rounds' pairs) and memory: the weights' bytes, plus the peak of the bytes allocated
during one ``generate`` above those allocated before it (torch profiler memory records).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from blip2_pair import (SIZES, hf_blip2, hf_inputs, images, parameter_bytes, save_folders, step_peak_bytes,
                        xllm_model, xllm_prompts)
from rounds import alternating, speed_ratios, spread


def agreement(ours: list[str], theirs: list[str]) -> tuple[float, float]:
    """The shares of identical captions and of words equal at their position."""
    same = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    pairs = [(a, b) for x, y in zip(ours, theirs) for a, b in zip(x.split(), y.split())]
    words = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    return same, words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=40, help="tokens per caption, on both sides (40: "
                                                                   "run.max_new_tokens' default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    hf = hf_blip2(size).eval()
    with tempfile.TemporaryDirectory() as root:
        model = xllm_model(size, *save_folders(hf, size, Path(root))).eval()
    batch = xllm_prompts(model, size, images(size, args.batch))
    inputs = {key: value for key, value in hf_inputs(model, batch).items() if key != "labels"}
    prompt_length = inputs["input_ids"].shape[1]
    length = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}

    def ours() -> list[str]:
        return model.generate(batch, **length)

    @torch.no_grad()
    def theirs() -> list[str]:
        # transformers returns the prompt's ids before the new ones
        out = hf.generate(**inputs, **length, do_sample=False, num_beams=1)
        return [model.llm.decode(row) for row in out[:, prompt_length:].tolist()]

    same, words = agreement(ours(), theirs())
    print(f"fp32 greedy captions of {args.new_tokens} tokens: {100 * same:.0f} % identical, "
          f"{100 * words:.1f} % of words equal at their position")
    seconds = alternating({"xllm": ours, "hf": theirs}, args.rounds)
    memory = {"xllm": (parameter_bytes(model), step_peak_bytes(ours)),
              "hf": (parameter_bytes(hf), step_peak_bytes(theirs))}

    print(f"\ngreedy captioning, {args.size} size, batch {args.batch}, prompt {prompt_length} positions, "
          f"{args.new_tokens} new tokens, KV cache, fp32, {args.threads} thread(s), {args.rounds} rounds "
          "(median (range))")
    print(f"{'model':<6}{'captions/s':>20}{'xllm / hf':>20}{'weights MiB':>13}{'generate peak MiB':>19}")
    ratios = speed_ratios(seconds["xllm"], seconds["hf"])
    for side in ("xllm", "hf"):
        rates = [args.batch / s for s in seconds[side]]
        weights, peak = memory[side]
        print(f"{side:<6}{spread(rates):>20}{spread(ratios) if side == 'xllm' else '':>20}"
              f"{weights / 2 ** 20:>13.0f}{peak / 2 ** 20:>19.0f}")
    print("generate peak: bytes allocated during one generate() above those allocated before it (torch profiler "
          "memory)")


if __name__ == "__main__":
    main()
