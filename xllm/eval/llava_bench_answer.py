"""Answers to LLaVA-Bench (COCO) from a model built by a run config, as ``evaluate.py`` builds it.

The config's model section gives the model (``--checkpoint`` its trained weights) and its ``llava_bench``
dataset the benchmark folder and the prompt; ``run.max_new_tokens``, ``run.num_beams`` and
``run.eval_batch_size`` the decoding (greedy unless beams are asked for). The output is LLaVA's answer JSONL,
one line per question in question order: ``{"question_id", "prompt", "text", "answer_id", "model_id",
"metadata"}``, the metadata holding the generation settings and the image file. A question whose image is
missing gets ``"text": null`` and ``metadata.unanswered`` saying why. Answers are appended as batches finish;
a later run keeps the answers already in the file (when they were made with the same model id and settings)
and computes the rest, unanswered questions included.

This module is the benchmark's one entry point that builds a model, which is why it, unlike the rest of
``xllm.eval``, imports the config, datasets and models layers (see ``tests/test_layers.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from xllm import zoo
from xllm.common.config import ConfigError, as_list
from xllm.common.dist import pick_device
from xllm.config import load_config
from xllm.datasets.builders.llava_bench import LlavaBenchDataset
from xllm.datasets.registry import BUILDERS
from xllm.eval.llava_bench_files import append_record, read_resumable, rewrite_records
from xllm.models.builder import build_model

log = logging.getLogger(__name__)
BUILDER = "llava_bench"


def benchmark_entry(cfg, cfg_path: str | Path):
    """The config's one ``llava_bench`` dataset block."""
    entries = [entry for entry in cfg.datasets.values() if entry.builder == BUILDER]
    if len(entries) != 1:
        raise ConfigError(f"{cfg_path}: the 'datasets' section must hold one dataset with builder: {BUILDER}, "
                          f"found {len(entries)}")
    return entries[0]


def answer_id(model_id: str, question_id: int, text: str | None, settings: dict) -> str:
    """A digest of what the answer is: the same model, settings and text give the same id on every run (LLaVA
    draws a random one), so a review names the exact answer it judged."""
    payload = json.dumps([model_id, question_id, text, settings], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(payload.encode()).hexdigest()[:22]


def record(question, text: str | None, model_id: str, settings: dict) -> dict:
    metadata = {**settings, "image": None if question.image_path is None else question.image_path.name}
    if text is None:
        metadata["unanswered"] = question.missing
    return {"question_id": question.question_id, "prompt": question.text, "text": text,
            "answer_id": answer_id(model_id, question.question_id, text, settings), "model_id": model_id,
            "metadata": metadata}


def kept_answers(output: Path, model_id: str, settings: dict, question_ids: set[int]) -> dict[int, dict]:
    """The answers an earlier run wrote to ``output``, by question; an answer to another question, or made by
    another model id or with other settings, is an error (the file would mix two evaluations)."""
    kept = {}
    for found in read_resumable(output, "answer"):
        if found.get("question_id") not in question_ids:
            raise ValueError(f"{output}: holds an answer to question {found.get('question_id')!r}, which the "
                             "benchmark's question file does not ask: write to another --output")
        earlier = {k: v for k, v in found.get("metadata", {}).items() if k not in ("image", "unanswered")}
        if found.get("model_id") != model_id or earlier != settings:
            raise ValueError(f"{output}: the answer to question {found.get('question_id')} was made by "
                             f"{found.get('model_id')!r} with {earlier}; this run is {model_id!r} with {settings}: "
                             "write to another --output")
        if found.get("text") is not None:  # unanswered ones are tried again: the image may be there now
            kept[found["question_id"]] = found
    return kept


@torch.no_grad()
def answer_benchmark(cfg_path: str | Path, options: list[str] | None = None, output: str | Path | None = None,
                     model_id: str | None = None, batch_size: int | None = None,
                     bench_dir: str | Path | None = None) -> Path:
    """Answers every question of the config's benchmark into ``output`` (default ``<run.output_dir>/answers.jsonl``),
    keeping what an earlier run answered; returns the output path."""
    cfg = load_config(cfg_path, options)
    entry, run = benchmark_entry(cfg, cfg_path), cfg.run
    if bench_dir is not None:
        entry.root = str(bench_dir)
    dataset: LlavaBenchDataset = BUILDERS.get(BUILDER)(entry).build("test")
    output = Path(output) if output is not None else Path(run.output_dir) / "answers.jsonl"
    model_id = model_id or f"xllm-{cfg.model.model_type}"
    settings = {"prompt_template": entry.prompt, "image_size": entry.image_size, "max_new_tokens": run.max_new_tokens,
                "num_beams": run.num_beams, "do_sample": False,
                "checkpoint": None if cfg.model.checkpoint is None else [str(c) for c in as_list(cfg.model.checkpoint)]}
    kept = kept_answers(output, model_id, settings, {q.question_id for q in dataset.questions})
    todo = [i for i, q in enumerate(dataset.questions) if q.question_id not in kept]
    for index in todo:
        if dataset.questions[index].missing:
            append_record(output, record(dataset.questions[index], None, model_id, settings))
    todo = [i for i in todo if not dataset.questions[i].missing]
    log.info("%d answers kept from %s, %d to compute", len(kept), output, len(todo))
    if todo:
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)
        zoo.ensure(cfg.model)
        model = build_model(cfg.model).to(pick_device(run.device)).eval()
        step = batch_size or run.eval_batch_size
        for start in range(0, len(todo), step):
            samples = [dataset[i] for i in todo[start: start + step]]
            texts = model.generate({"image": torch.stack([s["image"] for s in samples]),
                                    "prompt": [s["prompt"] for s in samples]},
                                   max_new_tokens=run.max_new_tokens, num_beams=run.num_beams)
            for index, text in zip(todo[start: start + step], texts):
                append_record(output, record(dataset.questions[index], text, model_id, settings))
            log.info("answered %d of %d", min(start + step, len(todo)), len(todo))
    # In question order, the last record of a question counting: kept answers, then this run's.
    final = {r["question_id"]: r for r in read_resumable(output, "answer")}
    rewrite_records(output, (final[q.question_id] for q in dataset.questions))
    unanswered = [q.question_id for q in dataset.questions if final[q.question_id]["text"] is None]
    if unanswered:
        log.warning("%d questions unanswered (their image is missing): %s", len(unanswered),
                    ", ".join(map(str, unanswered)))
    return output
