"""Transcribe real human speech, Debian's ``pocketsphinx-testdata`` utterances, with trained speech weights, beside
Whisper's own decoder on the same files.

``python scripts/eval_pocketsphinx.py --cfg-path configs/mini/eval_asr.yaml configs/tiny/eval_asr.yaml
[--whisper openai/whisper-tiny.en | none]``

The utterances (spoken playing cards and a LibriVox reading, 16 kHz WAV) come with transcripts in Sphinx's
``<s> words </s> (utterance id)`` format. Each evaluation config gives one row: its model, task and decoding (its
``datasets`` section is not used; the prompt is the English default), so the WER printed is that of the weights
its stages produced. ``--whisper`` adds the row of a complete Whisper model decoding with its own decoder
(transformers' ``generate``, greedy), found as any model name is (``xllm.models.sources``). Every row is scored
by the same normalisation (``xllm.eval.asr_metrics``). Prints each reference and hypothesis, then one table, and
writes ``pocketsphinx_report.json`` to the first config's ``run.output_dir``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from xllm import zoo
from xllm.common.dist import pick_device
from xllm.config import load_config
from xllm.datasets.builders.asr import ASRRecord
from xllm.datasets.builders.speech_instruction import SpeechInstructionDataset, default_prompts
from xllm.datasets.loader import evaluation_loader
from xllm.eval.asr_metrics import asr_report
from xllm.models.builder import build_model
from xllm.models.sources import model_folder
from xllm.processors.audio import SAMPLE_RATE, AudioProcessor, load_audio
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


def model_transcripts(cfg_path: str, options: list[str], records: list[ASRRecord]) -> tuple[list[dict], Path]:
    """Rows ``{id, reference, prediction, lang}`` of an evaluation config's model, and its output folder."""
    cfg = load_config(cfg_path, options)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    zoo.ensure(cfg.model)
    model = build_model(cfg.model).to(pick_device(cfg.run.device)).eval()
    # The encoder's window bounds what one pass can hear; the longest utterance here is 7.1 s.
    audio = {"max_seconds": model.encoders["speech"].window_frames / 100}
    dataset = SpeechInstructionDataset(records, AudioProcessor.from_config(audio), default_prompts(), "en",
                                       training=False)
    task = TASKS.get(cfg.run.task)(cfg.run)
    loader = evaluation_loader(dataset, task.collator(model, training=False), cfg.run.eval_batch_size)
    return task.collect(model, loader, "en"), Path(cfg.run.output_dir)


@torch.no_grad()
def whisper_transcripts(name: str, records: list[ASRRecord]) -> list[dict]:
    """Rows of a complete Whisper model transcribing each utterance with its own decoder, greedily."""
    folder = model_folder(name, "--whisper")
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    rows = []
    for record in records:
        features = processor(load_audio(record.audio), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        ids = model.generate(features.input_features, num_beams=1, do_sample=False)
        rows.append({"id": record.utt_id, "reference": record.text, "lang": "en",
                     "prediction": processor.batch_decode(ids, skip_special_tokens=True)[0].strip()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", nargs="+", default=["configs/tiny/eval_asr.yaml"],
                        help="evaluation configs, one row each")
    parser.add_argument("--whisper", default="openai/whisper-tiny.en",
                        help="a complete Whisper model decoding with its own decoder, or 'none'")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--options", nargs="+", default=[], help="overrides applied to every config")
    args = parser.parse_args()
    records = pocketsphinx_records(args.data_root)
    systems, folders = {}, []
    for cfg_path in args.cfg_path:
        systems[cfg_path], folder = model_transcripts(cfg_path, args.options, records)
        folders.append(folder)
    if args.whisper != "none":
        systems[f"{args.whisper} (own decoder)"] = whisper_transcripts(args.whisper, records)
    reports = {}
    for system, rows in systems.items():
        print(f"\n{system}")
        for row in rows:
            print(f"{row['id']}\n  ref: {row['reference']}\n  hyp: {row['prediction']}")
        reports[system] = asr_report([r["reference"] for r in rows], [r["prediction"] for r in rows],
                                     [r["lang"] for r in rows])
    width = max(len(system) for system in reports)
    print(f"\npocketsphinx-testdata, {len(records)} human utterances\n{'system':<{width}}  {'WER':>7}  {'CER':>7}")
    for system, report in reports.items():
        print(f"{system:<{width}}  {report['wer']:>7.3f}  {report['cer']:>7.3f}")
    output_dir = folders[0]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "pocketsphinx_report.json").write_text(
        json.dumps({system: {"metrics": reports[system], "rows": rows} for system, rows in systems.items()}, indent=2))


if __name__ == "__main__":
    main()
