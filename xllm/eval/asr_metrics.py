"""Speech recognition error rates: CER and WER at corpus level, with the usual text normalisation.

The rate is (substitutions + deletions + insertions) / reference length summed over the corpus, not a
mean of per-utterance rates, so long utterances weigh what they should. Every hypothesis counts: a missing
(None) or empty hypothesis is all deletions.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

# Joins hyphenated words ("state-of-the-art" -> "state of the art") before punctuation is removed.
HYPHENS = re.compile(r"[-\u2010-\u2015]")


@dataclass(frozen=True)
class ErrorCounts:
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """Errors per reference unit; an empty reference corpus gives 0.0 with no errors and inf with some."""
        if self.reference_length == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return self.errors / self.reference_length

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
        )


def normalize_text(text: str, lang: str = "en") -> str:
    """Normalise a transcript before scoring.

    en: NFKC, lowercase, hyphens to spaces, punctuation removed (apostrophes inside words kept: "don't"),
    whitespace collapsed. zh: NFKC (full-width to half-width), punctuation of both widths and all spaces
    removed, Latin letters lowercased, so the characters alone are compared.
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    if lang == "en":
        text = HYPHENS.sub(" ", text)
        text = "".join(" " if _is_punctuation(ch) and ch != "'" else ch for ch in text)
        # Quotes such as 'word' lose their apostrophes; contractions keep theirs.
        text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
        return " ".join(text.split())
    if lang == "zh":
        return "".join(ch for ch in text if not _is_punctuation(ch) and not ch.isspace())
    raise ValueError(f"normalize_text supports lang 'en' or 'zh', got {lang!r}")


def _is_punctuation(ch: str) -> bool:
    # Unicode categories P* (punctuation) and S* (symbols: $, +, ~, full-width ones after NFKC).
    return unicodedata.category(ch)[0] in "PS"


def edit_distance(ref: Sequence, hyp: Sequence) -> ErrorCounts:
    """Levenshtein alignment of two token sequences with the breakdown into S, D, I.

    A hand-written dynamic programme: it is a few lines, exact, and saves a dependency. Among alignments of
    minimal total cost it prefers substitutions, then deletions, then insertions (the usual sclite tie-break).
    """
    rows, cols = len(ref) + 1, len(hyp) + 1
    # cost[i][j] = (total, substitutions, deletions, insertions) aligning ref[:i] with hyp[:j].
    previous = [(j, 0, 0, j) for j in range(cols)]
    for i in range(1, rows):
        current = [(i, 0, i, 0)]
        for j in range(1, cols):
            diagonal = previous[j - 1]
            if ref[i - 1] == hyp[j - 1]:
                match = diagonal
            else:
                match = (diagonal[0] + 1, diagonal[1] + 1, diagonal[2], diagonal[3])
            up, left = previous[j], current[j - 1]
            deletion = (up[0] + 1, up[1], up[2] + 1, up[3])
            insertion = (left[0] + 1, left[1], left[2], left[3] + 1)
            current.append(min(match, deletion, insertion, key=lambda c: c[0]))
        previous = current
    _, substitutions, deletions, insertions = previous[-1]
    return ErrorCounts(substitutions, deletions, insertions, len(ref))


def _corpus_counts(refs: Sequence[str], hyps: Sequence[str | None], split) -> ErrorCounts:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses: every utterance needs one of each")
    counts = ErrorCounts()
    for ref, hyp in zip(refs, hyps):
        counts = counts + edit_distance(split(ref), split(hyp or ""))
    return counts


def wer(refs: Sequence[str], hyps: Sequence[str | None]) -> tuple[float, ErrorCounts]:
    """Word error rate over whitespace-separated words, and its counts. Normalise the texts first."""
    counts = _corpus_counts(refs, hyps, str.split)
    return counts.rate, counts


def cer(refs: Sequence[str], hyps: Sequence[str | None]) -> tuple[float, ErrorCounts]:
    """Character error rate, and its counts; spaces are not characters (Chinese transcripts often have some)."""
    counts = _corpus_counts(refs, hyps, lambda text: [ch for ch in text if not ch.isspace()])
    return counts.rate, counts


def asr_report(references: list[str], hypotheses: list[str | None], langs: list[str]) -> dict[str, float]:
    """Corpus CER and WER after each utterance's language's normalisation; every hypothesis counts."""
    refs = [normalize_text(r, lang) for r, lang in zip(references, langs)]
    hyps = [normalize_text(h or "", lang) for h, lang in zip(hypotheses, langs)]
    cer_rate, _ = cer(refs, hyps)
    wer_rate, _ = wer(refs, hyps)
    return {"cer": cer_rate, "wer": wer_rate, "utterances": len(refs), "empty_hypotheses": sum(not h for h in hyps)}
