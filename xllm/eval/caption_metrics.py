"""Caption metrics: corpus BLEU-4 and CIDEr, exact match, and per-attribute accuracy on the synthetic world.

BLEU-4 and CIDEr are pycocoevalcap's scorers (``Bleu``, ``Cider``), the reference code of the COCO caption
benchmark. Its PTB tokenizer runs Java, so xllm tokenises the captions itself and gives the scorers each
caption as its tokens joined by spaces, which is what they split on: lower-cased words for English (what the
PTB tokenizer also makes of the world's captions) and characters for Chinese, which writes no spaces between
words. Exact match (on the same tokens) and attribute accuracy, which parses the world's caption grammar,
are written here.
"""

from __future__ import annotations

import re
from collections import Counter

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from xllm.world.scenes import ATTRIBUTES, parse_caption


def tokens(text: str, lang: str) -> list[str]:
    """The units every caption metric compares: lower-cased words (en) or characters without punctuation (zh)."""
    if lang == "zh":
        return [ch for ch in text if not ch.isspace() and not re.match(r"[^\w]", ch)]
    return re.findall(r"[a-z0-9]+", text.lower())


def _scorer_input(references: list[list[str]], hypotheses: list[str | None], lang: str):
    """pycocoevalcap's ``gts`` and ``res``: {index: [pre-tokenised caption, ...]}; a missing hypothesis is empty."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets but {len(hypotheses)} hypotheses")
    gts = {i: [" ".join(tokens(r, lang)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokens(h or "", lang))] for i, h in enumerate(hypotheses)}
    return gts, res


def bleu(references: list[list[str]], hypotheses: list[str | None], lang: str = "en") -> float:
    """Corpus BLEU-4 in [0, 1]; each hypothesis may have several references (the closest in length sets the
    brevity penalty).

    pycocoevalcap adds 1e-15 to every matched n-gram count, so where the corpus matches no 4-gram the score is
    a tiny positive number rather than 0.
    """
    scores, _ = Bleu(4).compute_score(*_scorer_input(references, hypotheses, lang), verbose=0)
    return scores[3]


def cider(references: list[list[str]], hypotheses: list[str | None], lang: str = "en") -> float:
    """Corpus CIDEr (pycocoevalcap's: 1- to 4-grams, length penalty sigma 6), from 0 (no overlap) up to 10.

    Its n-gram weights (tf-idf) come from the references being scored, so it compares runs on the same
    references only: an n-gram in every reference weighs nothing, and a corpus of one caption always scores 0.
    """
    score, _ = Cider().compute_score(*_scorer_input(references, hypotheses, lang))
    return float(score)


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
        for shape, named in zip(ref_shapes, hyp_shapes):
            for attribute in ATTRIBUTES:
                correct[attribute] += getattr(shape, attribute) == getattr(named, attribute)
    return {attribute: correct[attribute] / total for attribute in ATTRIBUTES} if total else {}


def caption_report(references: list[str], hypotheses: list[str], lang: str = "en") -> dict[str, float]:
    """Every caption metric that applies: attribute accuracies only when the references follow the world grammar."""
    reference_sets = [[r] for r in references]
    report = {"samples": len(references), "exact_match": exact_match(references, hypotheses, lang),
              "bleu4": bleu(reference_sets, hypotheses, lang), "cider": cider(reference_sets, hypotheses, lang)}
    report.update({f"accuracy_{k}": v for k, v in attribute_accuracy(references, hypotheses, lang).items()})
    return report


def format_table(report: dict[str, float], title: str) -> str:
    width = max(len(k) for k in report)
    rows = [f"{key:<{width}}  " + (f"{value:>10,}" if isinstance(value, int) else f"{value:>10.4f}")
            for key, value in report.items()]
    return "\n".join([title, "-" * (width + 12), *rows])
