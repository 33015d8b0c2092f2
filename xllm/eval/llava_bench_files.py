"""The record files of LLaVA-Bench: read as a JSON list or as JSON lines, appended to as work is done, rewritten
whole at the end.

Answers and reviews are appended one record at a time, so an interrupted run keeps what it finished; when a
question's record appears twice (a retried question, an unanswered one answered on a later run) the later
record is the one that counts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


def read_records(path: str | Path, what: str) -> list[dict]:
    """The records of ``path``: a JSON list (X-LLM's published review.json) or one JSON object a line (LLaVA's
    files, ours). A missing file or a bad line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a valid JSON list: {error}") from None
        return _checked(records, path, lambda index: f"item {index}")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object: {error}") from None
    return _checked(records, path, lambda index: f"record {index + 1}")


def _checked(records: list, path: Path, name) -> list[dict]:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: {name(index)} is a {type(record).__name__}, not a JSON object")
    return records


def read_resumable(path: Path, what: str) -> list[dict]:
    """The records an earlier run appended to ``path`` (none when it does not exist). A last line cut short by an
    interruption is dropped with a warning; a bad line before it is an error, as in ``read_records``."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[-1].strip():
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            log.warning("%s: dropping its last line, cut short by an interrupted run", path)
            path.write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
    return read_records(path, what)


def append_record(path: Path, record: dict) -> None:
    """One record at the end of ``path``, flushed: what an interrupted run finished stays on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())


def rewrite_records(path: Path, records: Iterable[dict]) -> None:
    """``path`` holding exactly ``records``, replaced in one rename so a reader never sees half a file."""
    staged = path.with_name(path.name + ".tmp")
    with staged.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    staged.replace(path)
