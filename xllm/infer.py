"""Batch inference: ``python -m xllm.infer --checkpoint RUN --requests in.jsonl --output out.jsonl``.

Each request line is ``{"id": ..., "prompt": "...", "image": PATH, "speech": PATH, "video": PATH}`` with any of
the model's modalities (a path or a list of paths each); a prompt without media spans gets one span per medium
in front, as the chat does. Answers are written one line per request, ``{"id", "prompt", "text", "generation"}``,
in request order, flushed batch by batch. Resumable: ids already in the output are not answered again. A request
that cannot be read (a missing file, a modality the model lacks) is written with ``"text": null`` and its error,
never skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tqdm import tqdm

from xllm.common.logging import setup_logging
from xllm.demo.session import load_run
from xllm.models.xllm import XLLM
from xllm.processors.collator import marker, media_span

log = logging.getLogger(__name__)


def read_requests(path: Path) -> list[dict]:
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(request, dict) or "id" not in request or not isinstance(request.get("prompt"), str):
            raise ValueError(f"{path}:{number}: a request needs an 'id' and a string 'prompt'")
        requests.append(request)
    ids = [str(r["id"]) for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: request ids repeat ({sorted({i for i in ids if ids.count(i) > 1})[:5]})")
    return requests


def answered_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {str(json.loads(line)["id"]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def prepared(request: dict, processors: dict) -> dict:
    """The request as one sample for ``model.generate``: media read, spans placed."""
    known = set(processors)
    asked = [key for key in request if key not in ("id", "prompt")]
    unknown = [key for key in asked if key not in known]
    if unknown:
        raise ValueError(f"this model reads no {', '.join(unknown)} (it reads {', '.join(sorted(known))})")
    prompt, sample = request["prompt"], {}
    for modality in asked:
        paths = request[modality] if isinstance(request[modality], list) else [request[modality]]
        sample[modality] = [processors[modality](path) for path in paths]
        missing = len(paths) - prompt.count(marker(modality))
        prompt = media_span(modality) * max(missing, 0) + (" " if missing > 0 else "") + prompt
    return {"prompt": prompt, **sample}


def infer(model: XLLM, processors: dict, requests: list[dict], output: Path, batch_size: int,
          generation: dict) -> int:
    """Answers the requests not yet in ``output``; returns how many it answered."""
    done = answered_ids(output)
    todo = [r for r in requests if str(r["id"]) not in done]
    with output.open("a", encoding="utf-8") as sink, tqdm(total=len(todo), desc="infer") as progress:
        for start in range(0, len(todo), batch_size):
            rows, samples = [], []
            for request in todo[start:start + batch_size]:
                try:
                    samples.append((request, prepared(request, processors)))
                except (OSError, ValueError) as error:
                    log.warning("request %s: %s", request["id"], error)
                    rows.append({"id": request["id"], "prompt": request["prompt"], "text": None, "error": str(error)})
            if samples:
                inputs = {"prompt": [s["prompt"] for _, s in samples]}
                for modality in processors:
                    media = [m for _, s in samples for m in s.get(modality, [])]
                    if media:
                        inputs[modality] = media
                texts = model.generate(inputs, **generation)
                rows += [{"id": r["id"], "prompt": s["prompt"], "text": t, "generation": generation}
                         for (r, s), t in zip(samples, texts)]
            order = {str(r["id"]): i for i, r in enumerate(todo[start:start + batch_size])}
            for row in sorted(rows, key=lambda row: order[str(row["id"])]):
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            progress.update(len(rows))
    return len(todo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder (train.py's output_dir)")
    parser.add_argument("--requests", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    setup_logging()
    model, processors = load_run(args.checkpoint, args.device)
    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    answered = infer(model, processors, read_requests(args.requests), args.output, args.batch_size, generation)
    print(f"{answered} requests answered into {args.output}")


if __name__ == "__main__":
    main()
