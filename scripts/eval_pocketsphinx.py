"""Transcribe real human speech, Debian's ``pocketsphinx-testdata`` utterances, with trained speech weights.

``python scripts/eval_pocketsphinx.py --cfg-path configs/tiny/eval_asr.yaml [--checkpoint RUN_OR_FILE]``

The utterances (spoken playing cards and a LibriVox reading, 16 kHz WAV) come with transcripts in Sphinx's
``<s> words </s> (utterance id)`` format. The model, task and decoding are the evaluation config's (its
``datasets`` section is not used; the prompt is the English default), so the WER printed is that of the
weights a stage produced. Prints each reference and hypothesis and writes ``pocketsphinx_report.json`` to
``run.output_dir``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from xllm import zoo
from xllm.common.dist import pick_device
from xllm.config import load_config
from xllm.datasets.builders.asr import ASRRecord
from xllm.datasets.builders.speech_instruction import SpeechInstructionDataset, default_prompts
from xllm.datasets.loader import evaluation_loader
from xllm.eval.caption_metrics import format_table
from xllm.models.builder import build_model
from xllm.processors.audio import AudioProcessor
from xllm.tasks.registry import TASKS

DEFAULT_ROOT = Path("/usr/share/pocketsphinx/test/data")
# (folder, transcript file) of each set with WAV audio; the other sets hold raw or pre-computed features.
SETS = (("cards", "cards.transcription"), ("librivox", "transcription"))
SPHINX_LINE = re.compile(r"^\s*(?:<s>)?\s*(?P<text>.*?)\s*(?:</s>)?\s*\((?P<id>[^()\s]+)\)\s*$")


def read_sphinx_transcripts(path: Path) -> dict[str, str]:
    """``{utterance id: words}`` of a Sphinx transcript; a line that is not ``<s> words </s> (id)`` is an error."""
    transcripts = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        match = SPHINX_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: not a Sphinx transcript line: {line!r}")
        transcripts[match["id"]] = match["text"]
    return transcripts


def pocketsphinx_records(root: Path) -> list[ASRRecord]:
    records = []
    for folder, transcript in SETS:
        path = root / folder / transcript
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: install Debian's pocketsphinx-testdata "
                                    "(apt-get install pocketsphinx-testdata) or pass --data-root")
        for utt_id, text in read_sphinx_transcripts(path).items():
            audio = root / folder / f"{utt_id}.wav"
            if not audio.is_file():
                raise FileNotFoundError(f"utterance {utt_id!r} of {path}: audio file {audio} does not exist")
            records.append(ASRRecord(f"{folder}/{utt_id}", audio, text, {"lang": "en"}))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", default="configs/tiny/eval_asr.yaml")
    parser.add_argument("--checkpoint", help="trained weights (default: the config's model.checkpoint)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--options", nargs="+", default=[])
    args = parser.parse_args()
    options = args.options + ([f"model.checkpoint={args.checkpoint}"] if args.checkpoint else [])
    cfg = load_config(args.cfg_path, options)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    zoo.ensure(cfg.model)
    model = build_model(cfg.model).to(pick_device(cfg.run.device)).eval()
    # The encoder's window bounds what one pass can hear; the longest utterance here is 7.1 s.
    audio = {"max_seconds": model.encoders["speech"].window_frames / 100}
    dataset = SpeechInstructionDataset(pocketsphinx_records(args.data_root), AudioProcessor.from_config(audio),
                                       default_prompts(), "en", training=False)
    task = TASKS.get(cfg.run.task)(cfg.run)
    loader = evaluation_loader(dataset, task.collator(model, training=False), cfg.run.eval_batch_size)
    metrics, rows = task.evaluate(model, loader, "asr", "en")
    for row in rows:
        print(f"{row['id']}\n  ref: {row['reference']}\n  hyp: {row['prediction']}")
    print(format_table(metrics, f"pocketsphinx-testdata ({len(rows)} utterances, checkpoint {cfg.model.checkpoint})"))
    output_dir = Path(cfg.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "pocketsphinx_report.json").write_text(json.dumps({"metrics": metrics, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
