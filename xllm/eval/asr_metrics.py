"""Speech recognition error rates: CER and WER at corpus level, with the usual text normalisation.

The alignment of a reference with a hypothesis, and its breakdown into substitutions, deletions and
insertions, is jiwer's (Levenshtein through rapidfuzz). Around it xllm keeps what the figures are defined by:
the normalisation (``normalize_text``, English and Chinese); CER over characters other than spaces, since
Chinese transcripts carry stray spaces and jiwer's own CER counts spaces as characters, so each non-space
character is given to jiwer as a word; and corpus rates, (substitutions + deletions + insertions) / reference
length summed over the corpus, not a mean of per-utterance rates, so long utterances weigh what they should.
Every hypothesis counts: a missing (None) or empty hypothesis is all deletions.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import astuple, dataclass
from typing import Sequence

import jiwer

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
        return ErrorCounts(*(a + b for a, b in zip(astuple(self), astuple(other))))


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


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> ErrorCounts:
    """jiwer's alignment of two token sequences (tokens without whitespace), as counts.

    Among alignments of minimal total cost jiwer picks one (for "a b" -> "b a": a deletion and an insertion,
    not two substitutions); the total is the edit distance whichever it picks.
    """
    if not ref:
        # jiwer before 4.0 refuses an empty reference; against one, every hypothesis token is an insertion.
        return ErrorCounts(insertions=len(hyp))
    # jiwer splits sentences on spaces, so tokens joined by single spaces reach it unchanged.
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, len(ref))


def _corpus_rate(refs: Sequence[str], hyps: Sequence[str | None], split) -> tuple[float, ErrorCounts]:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses: every utterance needs one of each")
    counts = sum((edit_distance(split(ref), split(hyp or "")) for ref, hyp in zip(refs, hyps)), ErrorCounts())
    return counts.rate, counts


def wer(refs: Sequence[str], hyps: Sequence[str | None]) -> tuple[float, ErrorCounts]:
    """Word error rate over whitespace-separated words, and its counts. Normalise the texts first."""
    return _corpus_rate(refs, hyps, str.split)


def cer(refs: Sequence[str], hyps: Sequence[str | None]) -> tuple[float, ErrorCounts]:
    """Character error rate, and its counts; spaces are not characters, in English as in Chinese (whose
    transcripts often have stray ones)."""
    return _corpus_rate(refs, hyps, lambda text: [ch for ch in text if not ch.isspace()])


def asr_report(references: list[str], hypotheses: list[str | None], langs: list[str]) -> dict[str, float]:
    """Corpus CER and WER after each utterance's language's normalisation; every hypothesis counts."""
    refs = [normalize_text(r, lang) for r, lang in zip(references, langs)]
    hyps = [normalize_text(h or "", lang) for h, lang in zip(hypotheses, langs)]
    cer_rate, _ = cer(refs, hyps)
    wer_rate, _ = wer(refs, hyps)
    return {"cer": cer_rate, "wer": wer_rate, "utterances": len(refs), "empty_hypotheses": sum(not h for h in hyps)}
