"""Caption metrics: corpus BLEU-4, exact match, and per-attribute accuracy on the synthetic world.

BLEU is written here rather than taken from pycocoevalcap, which needs Java for its tokenizer; the formula is
Papineni et al.'s corpus BLEU (clipped n-gram precisions, geometric mean, brevity penalty), with words as
tokens for English and characters for Chinese.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from xllm.world.scenes import ATTRIBUTES, parse_caption


def tokens(text: str, lang: str) -> list[str]:
    if lang == "zh":
        return [ch for ch in text if not ch.isspace() and not re.match(r"[^\w]", ch)]
    return re.findall(r"[a-z0-9]+", text.lower())


def bleu(references: list[list[str]], hypotheses: list[str], lang: str = "en", max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` in [0, 1]; each hypothesis may have several references."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets but {len(hypotheses)} hypotheses")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for refs, hyp in zip(references, hypotheses):
        hyp_tokens = tokens(hyp or "", lang)
        ref_tokens = [tokens(r, lang) for r in refs]
        hyp_length += len(hyp_tokens)
        # The reference closest in length sets the brevity penalty (ties: the shorter one).
        ref_length += min((abs(len(r) - len(hyp_tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            hyp_ngrams = Counter(tuple(hyp_tokens[i:i + n]) for i in range(len(hyp_tokens) - n + 1))
            max_ref = Counter()
            for r in ref_tokens:
                max_ref |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(count, max_ref[gram]) for gram, count in hyp_ngrams.items())
            totals[n - 1] += max(0, len(hyp_tokens) - n + 1)
    if min(totals) == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / max(hyp_length, 1))
    return brevity * math.exp(log_precision)


def exact_match(references: list[str], hypotheses: list[str], lang: str = "en") -> float:
    return sum(tokens(r, lang) == tokens(h or "", lang) for r, h in zip(references, hypotheses)) / len(references)


def attribute_accuracy(references: list[str], hypotheses: list[str], lang: str = "en") -> dict[str, float]:
    """Per attribute, the share of reference shapes that the hypothesis names correctly, shape by shape in order.

    A shape the hypothesis leaves out counts as wrong on every attribute, so short captions cannot score well;
    an extra shape costs nothing here, but costs exact match and BLEU.
    """
    correct = Counter()
    total = 0
    for ref, hyp in zip(references, hypotheses):
        ref_shapes, hyp_shapes = parse_caption(ref, lang), parse_caption(hyp or "", lang)
        total += len(ref_shapes)
        for i, shape in enumerate(ref_shapes):
            if i < len(hyp_shapes):
                for attribute in ATTRIBUTES:
                    correct[attribute] += getattr(shape, attribute) == getattr(hyp_shapes[i], attribute)
    if total == 0:
        return {}
    return {attribute: correct[attribute] / total for attribute in ATTRIBUTES}


def caption_report(references: list[str], hypotheses: list[str], lang: str = "en") -> dict[str, float]:
    """Every caption metric that applies: attribute accuracies only when the references follow the world grammar."""
    report = {"samples": len(references), "exact_match": exact_match(references, hypotheses, lang),
              "bleu4": bleu([[r] for r in references], hypotheses, lang)}
    report.update({f"accuracy_{k}": v for k, v in attribute_accuracy(references, hypotheses, lang).items()})
    return report


def format_table(report: dict[str, float], title: str) -> str:
    width = max(len(k) for k in report)
    lines = [title, "-" * (width + 12)]
    for key, value in report.items():
        shown = f"{value:>10,}" if isinstance(value, int) else f"{value:>10.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
