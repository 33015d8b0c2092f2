"""The metrics a dataset's evaluation is scored by, by name (``datasets.<name>.metric``).

Each takes the references, the hypotheses (None or "" for a sample without an answer) and each sample's
language, and returns a flat ``{name: value}`` report.
"""

from __future__ import annotations

from collections.abc import Callable

from xllm.common.registry import Registry
from xllm.eval.asr_metrics import asr_report
from xllm.eval.caption_metrics import caption_report
from xllm.world.device import command_report, parse_command
from xllm.world.motion import motion_report, parse_motion

Metric = Callable[[list[str], list[str | None], list[str]], dict[str, float]]
METRICS: Registry[Metric] = Registry("metric")


def one_language(langs: list[str]) -> str:
    found = sorted(set(langs))
    if len(found) != 1:
        raise ValueError(f"caption metrics score one language at a time; the samples are in {found}")
    return found[0]


@METRICS.register("caption")
def caption(references: list[str], hypotheses: list[str | None], langs: list[str]) -> dict[str, float]:
    """Exact match, BLEU-4, CIDEr, and per-attribute accuracy when the references follow the world's grammar."""
    return caption_report(references, hypotheses, one_language(langs))


@METRICS.register("motion")
def motion(references: list[str], hypotheses: list[str | None], langs: list[str]) -> dict[str, float]:
    """Caption metrics, plus direction/colour/kind accuracy when every reference follows the motion grammar."""
    lang = one_language(langs)
    report = caption_report(references, hypotheses, lang)
    if all(parse_motion(r, lang) is not None for r in references):
        report.update(motion_report(references, hypotheses, lang))
    return report


@METRICS.register("command")
def command(references: list[str], hypotheses: list[str | None], langs: list[str]) -> dict[str, float]:
    """Caption metrics, plus command accuracy when every reference gives one of the world's commands."""
    report = caption_report(references, hypotheses, one_language(langs))
    if all(parse_command(r) is not None for r in references):
        report.update(command_report(references, hypotheses))
    return report


METRICS.register("asr")(asr_report)  # corpus CER and WER, each utterance normalised in its own language
