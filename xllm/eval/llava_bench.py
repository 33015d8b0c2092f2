"""LLaVA-Bench (COCO): answer its 90 questions, have an LLM judge review the answers, summarise the reviews.

    python -m xllm.eval.llava_bench answer --cfg-path configs/tiny/eval_llava_bench.yaml [--checkpoint RUN]
    python -m xllm.eval.llava_bench judge --answers ANSWERS --output REVIEWS --base-url URL --model NAME [--swap]
    python -m xllm.eval.llava_bench summarize REVIEWS [--exclude-failures] [--json] [--reference 1|2]

The summary is LLaVA's (``llava/eval/summarize_gpt_review.py``): per category and over all reviews, the mean
of each assistant's score rounded to 3 decimals, and the relative score round(mean model / mean reference x
100, 1). A review records which assistant was the reference (``reference``: 1 or 2); for files that do not,
``--reference`` says it. Its default, 2, is X-LLM's published review.json (Assistant 1 X-LLM, Assistant 2 GPT-4);
LLaVA's own review files put the reference first: ``--reference 1``. A failed review (LLaVA's ``[-1, -1]``, or
one with a ``failure`` reason) is averaged in as LLaVA did, unless ``--exclude-failures``; either way failures
are counted and listed. Reviews of both orders (``judge --swap``) are pooled: each counts once in the means.
See docs/llava_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xllm.common.logging import setup_logging
from xllm.eval.judge import ChatClient
from xllm.eval.llava_bench_files import read_records
from xllm.eval.llava_bench_review import FAILED, first_line, judge_answers, load_benchmark, parse_score

DEFAULT_REFERENCE = 2  # X-LLM's published review.json: Assistant 1 is X-LLM, Assistant 2 the GPT-4 reference
DEFAULT_BENCH_DIR = "../shared/benchmarks/llava_bench_coco"  # beside a checkout, run from the checkout
ALL = "all"


@dataclass
class Scored:
    question_id: object
    category: str | None
    model: float
    reference: float
    reference_assistant: int  # 1 or 2
    failure: str | None


@dataclass
class Group:
    reviews: int
    model: float | None  # mean score, rounded to 3 decimals as LLaVA rounds it
    reference: float | None
    relative: float | None  # round(model / reference * 100, 1)


@dataclass
class Summary:
    groups: dict[str, Group]  # the categories in sorted order, then "all"
    failures: list[Scored]
    failures_counted: bool
    reference_recorded: int  # reviews that say which assistant is the reference
    reference_unrecorded: int
    reference_default: int  # the reference assistant of those that do not
    by_order: dict[int, Group] = field(default_factory=dict)  # "all" per reference position, when both occur


def score(review: dict, index: int, reference: int, source: str) -> Scored:
    """One review's scores as (model, reference): its stored ``tuple``, else its ``content`` parsed as LLaVA
    parses it; ``[-1, -1]`` or a ``failure`` reason marks a failure."""
    where = f"{source}: review {index + 1} (question {review.get('question_id')})"
    assistant = review.get("reference", reference)
    if assistant not in (1, 2):
        raise ValueError(f"{where}: 'reference' must be 1 or 2, got {assistant!r}")
    pair = review.get("tuple")
    if pair is None:
        if "content" not in review:
            raise ValueError(f"{where} has neither 'tuple' nor 'content'")
        parsed = parse_score(review["content"])
        pair = FAILED if parsed is None else list(parsed)
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, (int, float)) for s in pair)):
        raise ValueError(f"{where}: 'tuple' must be two numbers, got {pair!r}")
    failure = review.get("failure")
    if failure is None and list(pair) == FAILED:
        content = review.get("content")
        failure = (f"[-1, -1]: the reply's first line is not two scores: {first_line(content)[:120]!r}"
                   if isinstance(content, str) and parse_score(content) is None else "its tuple is [-1, -1]")
    model, ref = (pair[1], pair[0]) if assistant == 1 else (pair[0], pair[1])
    return Scored(review.get("question_id"), review.get("category"), float(model), float(ref), assistant, failure)


def group(scored: list[Scored]) -> Group:
    if not scored:
        return Group(0, None, None, None)
    # LLaVA's arithmetic: numpy's mean, rounded to 3 decimals before the ratio.
    model, ref = (round(x, 3) for x in np.asarray([[s.model, s.reference] for s in scored]).mean(0).tolist())
    return Group(len(scored), model, ref, round(model / ref * 100, 1) if ref else None)


def summarize(reviews: list[dict], exclude_failures: bool = False, reference: int | None = None,
              source: str = "reviews") -> Summary:
    """LLaVA's summary of ``reviews``; ``reference`` (default ``DEFAULT_REFERENCE``) is the reference assistant of
    reviews that do not record one."""
    default = DEFAULT_REFERENCE if reference is None else reference
    scored = [score(r, i, default, source) for i, r in enumerate(reviews)]
    seen = set()
    for s in scored:
        if (s.question_id, s.reference_assistant) in seen:
            raise ValueError(f"{source}: question {s.question_id} is reviewed twice with the reference as Assistant "
                             f"{s.reference_assistant}")
        seen.add((s.question_id, s.reference_assistant))
    counted = [s for s in scored if not (exclude_failures and s.failure)]
    categories = sorted({s.category for s in scored if s.category is not None})
    groups = {c: group([s for s in counted if s.category == c]) for c in categories}
    groups[ALL] = group(counted)
    orders = sorted({s.reference_assistant for s in scored})
    by_order = {o: group([s for s in counted if s.reference_assistant == o]) for o in orders} if len(orders) > 1 else {}
    return Summary(groups, [s for s in scored if s.failure], not exclude_failures,
                   sum("reference" in r for r in reviews), sum("reference" not in r for r in reviews), default,
                   by_order)


def summary_json(summary: Summary) -> dict:
    return {**{name: g.relative for name, g in summary.groups.items()}, "failures": len(summary.failures)}


def format_summary(summary: Summary, source: str) -> str:
    def row(name: str, g: Group) -> str:
        shown = [f"{v:.1f}" if v is not None else "-" for v in
                 (g.relative, None if g.model is None else g.model * 10,
                  None if g.reference is None else g.reference * 10)]
        return f"{name:<22}{g.reviews:>8}{shown[0]:>10}{shown[1]:>11}{shown[2]:>15}"

    recorded = f"as recorded in {summary.reference_recorded} reviews" if summary.reference_recorded else ""
    unrecorded = (f"Assistant {summary.reference_default} in the {summary.reference_unrecorded} that do not "
                  "record it" if summary.reference_unrecorded else "")
    lines = [f"LLaVA-Bench (COCO) summary of {source}",
             f"reference answer: {'; '.join(filter(None, (recorded, unrecorded)))}",
             "failures " + ("averaged in as [-1, -1] (LLaVA's way)" if summary.failures_counted
                            else "left out of the means (--exclude-failures)"),
             f"{'category':<22}{'reviews':>8}{'relative':>10}{'model x10':>11}{'reference x10':>15}"]
    lines += [row(name, g) for name, g in summary.groups.items()]
    lines += [row(f"{ALL} (reference {'1st' if o == 1 else '2nd'})", g) for o, g in summary.by_order.items()]
    lines.append(f"{len(summary.failures)} failures" + (", by reason:" if summary.failures else ""))
    by_reason: dict[str, dict[int, list[str]]] = {}
    for s in summary.failures:  # one line per reason: a missing image fails its three questions alike
        by_reason.setdefault(s.failure, {}).setdefault(s.reference_assistant, []).append(str(s.question_id))
    for reason, orders in by_reason.items():
        ids = [", ".join(found) + (f" (reference {'1st' if o == 1 else '2nd'})" if summary.by_order else "")
               for o, found in sorted(orders.items())]
        lines.append(f"  question{'s' if sum(map(len, orders.values())) > 1 else ''} {', '.join(ids)}: {reason}")
    return "\n".join(lines)


def requires_judge(references: list[str], hypotheses: list, langs: list[str]) -> dict:
    """The metric of the ``llava_bench`` builder: its answers need the LLM judge, which no metric can replace."""
    raise ValueError("LLaVA-Bench is scored by an LLM judge, not by evaluate.py: run python -m xllm.eval.llava_bench "
                     "answer, then judge, then summarize (docs/llava_bench.md)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xllm.eval.llava_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    answer = commands.add_parser("answer", help="answer the questions with a model built from a run config")
    answer.add_argument("--cfg-path", default="tiny/eval_llava_bench.yaml")
    answer.add_argument("--checkpoint", help="trained weights: a run folder, a checkpoint folder or a file")
    answer.add_argument("--options", nargs="+", default=[])
    answer.add_argument("--output", help="the answer JSONL (default <run.output_dir>/answers.jsonl)")
    answer.add_argument("--bench-dir", help="the benchmark folder (default: the config's datasets.<name>.root)")
    answer.add_argument("--model-id", help="the answers' model_id (default xllm-<model_type>)")
    answer.add_argument("--batch-size", type=int, help="questions per generate call (default run.eval_batch_size)")
    judge = commands.add_parser("judge", help="review answers against GPT-4's with a chat-completions endpoint")
    judge.add_argument("--answers", required=True, help="the model's answer JSONL")
    judge.add_argument("--output", required=True, help="the review JSONL (kept reviews are not asked again)")
    judge.add_argument("--bench-dir", default=DEFAULT_BENCH_DIR, help=f"LLaVA's files (default {DEFAULT_BENCH_DIR})")
    judge.add_argument("--base-url", required=True, help="the endpoint, e.g. https://api.openai.com/v1")
    judge.add_argument("--model", required=True, help="the judge model to ask for")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="the environment variable holding the API key (unset: no key is sent)")
    judge.add_argument("--temperature", type=float, default=0.2)
    judge.add_argument("--max-tokens", type=int, default=1024)
    judge.add_argument("--seed", type=int)
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds for one request")
    judge.add_argument("--retries", type=int, default=5)
    judge.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, then doubled")
    judge.add_argument("--swap", action="store_true", help="a second pass with the model's answer first")
    summary = commands.add_parser("summarize", help="LLaVA's relative scores of a review file")
    summary.add_argument("reviews", help="reviews: a JSON list or JSON lines")
    summary.add_argument("--exclude-failures", action="store_true", help="leave failed reviews out of the means")
    summary.add_argument("--json", action="store_true", help="end with one JSON line of the relative scores")
    summary.add_argument("--reference", type=int, choices=(1, 2),
                         help=f"the reference assistant of reviews that do not record it (default {DEFAULT_REFERENCE})")
    args = parser.parse_args(argv)
    if args.command == "answer":
        from xllm.eval.llava_bench_answer import answer_benchmark  # builds a model: torch only when asked for

        setup_logging()
        options = args.options + ([f"model.checkpoint={args.checkpoint}"] if args.checkpoint else [])
        print(answer_benchmark(args.cfg_path, options, args.output, args.model_id, args.batch_size, args.bench_dir))
    elif args.command == "judge":
        setup_logging()
        client = ChatClient(args.base_url, args.model, api_key=os.environ.get(args.api_key_env) or None,
                            temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                            timeout=args.timeout, retries=args.retries, backoff=args.backoff)
        reviews = judge_answers(load_benchmark(args.bench_dir), Path(args.answers), Path(args.output), client,
                                args.swap)
        print(format_summary(summarize(reviews, source=args.output), args.output))
    else:
        result = summarize(read_records(args.reviews, "review"), args.exclude_failures, args.reference, args.reviews)
        print(format_summary(result, args.reviews))
        if args.json:
            print(json.dumps(summary_json(result)))


if __name__ == "__main__":
    main(sys.argv[1:])
