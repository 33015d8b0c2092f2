"""LLaVA-Bench (COCO)'s judged reviews: the judge's prompt, its scores parsed as LLaVA parses them, and the review
loop, resumable, that records every failure.

The prompt is LLaVA's (``llava/eval/eval_gpt_review_visual.py``): a system message, then a user message with the
image's captions and boxes as ``[Context]``, the question, the two answers and the category's rule from
``rule.json``. LLaVA puts the GPT-4 reference first and the model second; the optional swapped pass puts the
model first, to measure and cancel the judge's preference for a position. Every review records which assistant
was the reference (``reference``: 1 or 2), so the summary never has to guess.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from xllm.eval.judge import ChatClient
from xllm.eval.llava_bench_files import append_record, read_records, read_resumable, rewrite_records

log = logging.getLogger(__name__)

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
FAILED = [-1, -1]  # LLaVA's tuple for a review it could not parse, which its summary averages in
QUESTIONS, REFERENCES, CONTEXT, RULE = ("qa90_questions.jsonl", "qa90_gpt4_answer.jsonl",
                                        "caps_boxes_coco2014_val_80.jsonl", "rule.json")


def first_line(text: str) -> str:
    return text.split("\n")[0]


def parse_score(content: str | None) -> tuple[float, float] | None:
    """The two scores on the reply's first line, exactly as LLaVA reads them: commas become spaces and the line is
    split on single spaces, so ``"8 9"`` and ``"8,9"`` are scores and ``"8, 9"`` (three tokens) is not. None when
    the line is not two numbers: a failure."""
    if content is None:
        return None
    tokens = first_line(content).replace(",", " ").split(" ")
    if len(tokens) != 2:
        return None
    try:
        return float(tokens[0]), float(tokens[1])
    except ValueError:
        return None


@dataclass
class Benchmark:
    questions: list[dict]  # in the question file's order
    references: dict[int, dict]  # GPT-4's answers by question id
    contexts: dict[str, dict]  # captions and boxes by image file name
    rule: dict[str, dict]  # the judge's instruction by category


def load_benchmark(folder: str | Path) -> Benchmark:
    """LLaVA's files in ``folder`` (their released names), checked against each other: every question has a
    reference answer, a context for its image and a rule for its category."""
    folder = Path(folder)
    questions = read_records(folder / QUESTIONS, "LLaVA-Bench question")
    references = by_question(read_records(folder / REFERENCES, "reference answer"), folder / REFERENCES)
    contexts = {c["image"]: c for c in read_records(folder / CONTEXT, "caption and box context")}
    if not (folder / RULE).is_file():
        raise FileNotFoundError(f"judge rule file not found: {folder / RULE}")
    rule = json.loads((folder / RULE).read_text(encoding="utf-8"))
    for question in questions:
        qid, where = question["question_id"], f"question {question['question_id']} of {folder / QUESTIONS}"
        if qid not in references:
            raise ValueError(f"{where} has no reference answer in {folder / REFERENCES}")
        if question["image"] not in contexts:
            raise ValueError(f"{where}: its image {question['image']} has no context in {folder / CONTEXT}")
        if question["category"] not in rule:
            raise ValueError(f"{where}: its category {question['category']!r} has no rule in {folder / RULE}")
    return Benchmark(questions, references, contexts, rule)


def by_question(records: list[dict], path: Path) -> dict[int, dict]:
    """Records by ``question_id``, the last one of a question counting (see ``xllm.eval.llava_bench_files``)."""
    found = {}
    for index, record in enumerate(records):
        if "question_id" not in record:
            raise ValueError(f"{path}: record {index + 1} lacks 'question_id'")
        found[record["question_id"]] = record
    return found


def user_message(question: dict, context: dict, first: str, second: str, rule: dict) -> str:
    """LLaVA's judge prompt; the boxes are Python's repr of each list, as LLaVA's f-string prints them."""
    captions = "\n".join(context["captions"])
    boxes = "\n".join(f"{instance['category']}: {instance['bbox']}" for instance in context["instances"])
    role = rule["role"]
    return (f"[Context]\n{captions}\n\n{boxes}\n\n"
            f"[Question]\n{question['text']}\n\n"
            f"[{role} 1]\n{first}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{second}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def review(bench: Benchmark, question: dict, answer: dict, client: ChatClient, swapped: bool) -> dict:
    """One review of ``answer``; a failure (an unanswered question, a reply without two scores) keeps LLaVA's
    ``[-1, -1]`` tuple and says why in ``failure``, so the summary can count it or leave it out."""
    qid = question["question_id"]
    reference = bench.references[qid]
    # LLaVA's order, reference first; the swapped pass puts the model's answer first.
    first, second = (answer, reference) if swapped else (reference, answer)
    record = {"question_id": qid, "answer1_id": first.get("answer_id", qid),
              "answer2_id": second.get("answer_id", qid), "category": question["category"],
              "reference": 2 if swapped else 1, "swapped": swapped,
              "judge": {**client.settings(), "model": None}}
    if answer.get("text") is None:
        reason = (answer.get("metadata") or {}).get("unanswered", "no answer text")
        return {**record, "content": None, "tuple": FAILED, "failure": f"unanswered: {reason}"}
    content = user_message(question, bench.contexts[question["image"]], first["text"], second["text"],
                           bench.rule[question["category"]])
    reply = client.complete([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])
    record["judge"]["model"] = reply.model
    scores = parse_score(reply.content)
    if scores is not None:
        return {**record, "content": reply.content, "tuple": list(scores)}
    if reply.content is None:
        failure = f"the reply has no message content (finish_reason {reply.finish_reason!r})"
    else:
        failure = f"the reply's first line is not two scores: {first_line(reply.content)[:200]!r}"
    log.warning("question %s%s: %s", qid, " (swapped)" if swapped else "", failure)
    return {**record, "content": reply.content, "tuple": FAILED, "failure": failure}


def judge_answers(bench: Benchmark, answers_path: Path, output: Path, client: ChatClient,
                  swap: bool = False) -> list[dict]:
    """Reviews of every answer in ``answers_path`` (LLaVA's answer JSONL), reference first, and with ``swap`` a
    second pass with the model first; appended to ``output`` as they come, then written in order. Reviews an
    earlier run wrote are kept and not asked for again, when they review the same answers with the same judge
    settings (else an error: the file would mix two evaluations)."""
    answers = by_question(read_records(answers_path, "answer"), answers_path)
    expected = [q["question_id"] for q in bench.questions]
    missing, extra = sorted(set(expected) - set(answers)), sorted(set(answers) - set(expected))
    if missing or extra:
        raise ValueError(f"{answers_path} must answer exactly the benchmark's questions: "
                         f"missing {missing or 'none'}, unknown question ids {extra or 'none'}")
    done = {(r["question_id"], r.get("swapped", False)): r for r in read_resumable(output, "review")}
    passes = (False, True) if swap else (False,)
    for swapped in passes:
        for question in bench.questions:
            key = (question["question_id"], swapped)
            if key in done:
                check_resumed(done[key], answers[key[0]], client, output)
                continue
            done[key] = review(bench, question, answers[key[0]], client, swapped)
            append_record(output, done[key])
    order = {qid: index for index, qid in enumerate(expected)}
    reviews = sorted(done.values(), key=lambda r: (r["swapped"], order[r["question_id"]]))
    # Numbered in the final order, as LLaVA numbers its reviews (``id`` first).
    reviews = [{"id": index + 1, **{k: v for k, v in r.items() if k != "id"}} for index, r in enumerate(reviews)]
    rewrite_records(output, reviews)
    failures = [r for r in reviews if "failure" in r]
    log.info("%d reviews in %s, %d failures%s", len(reviews), output, len(failures),
             f" (questions {', '.join(map(str, sorted({r['question_id'] for r in failures})))})" if failures else "")
    return reviews


def check_resumed(stored: dict, answer: dict, client: ChatClient, output: Path) -> None:
    """A review kept from an earlier run must be of this answer, by this judge, with these settings."""
    qid = stored["question_id"]
    answer_id = answer.get("answer_id", qid)
    reviewed = stored.get("answer1_id") if stored.get("swapped") else stored.get("answer2_id")
    asked = {k: v for k, v in client.settings().items() if k != "base_url"}
    kept = {k: stored.get("judge", {}).get(k) for k in asked}
    if reviewed != answer_id or kept != asked:
        raise ValueError(f"{output}: the review of question {qid}{' (swapped)' if stored.get('swapped') else ''} was "
                         f"written for answer {reviewed!r} with judge settings {kept}; this run judges answer "
                         f"{answer_id!r} with {asked}: write the reviews to another --output")
