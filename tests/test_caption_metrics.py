import dataclasses
import math
import random
import re
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from xllm.eval.caption_metrics import attribute_accuracy, bleu, caption_report, cider, exact_match
from xllm.world.scenes import COLOURS, Scene, caption, sample_scene


def world_captions(lang: str, count: int = 40) -> tuple[list[str], list[str]]:
    """References of random scenes and hypotheses with mistakes: a shape's colour changed, the last shape left
    out, or the caption right."""
    rng = random.Random(7)
    references, hypotheses = [], []
    for i in range(count):
        scene = sample_scene(rng)
        shapes = list(scene.shapes)
        if i % 3 == 0:
            j = rng.randrange(len(shapes))
            shapes[j] = dataclasses.replace(shapes[j], colour=rng.choice([c for c in COLOURS if c != shapes[j].colour]))
        elif i % 3 == 1 and len(shapes) > 1:
            shapes.pop()
        references.append(caption(scene, lang))
        hypotheses.append(caption(Scene(tuple(shapes)), lang))
    return references, hypotheses


def by_hand(text: str, lang: str) -> str:
    """The fixtures' captions tokenised for pycocoevalcap without xllm: the world's captions have no punctuation
    but commas and full stops, and no upper case."""
    text = re.sub(r"[,.，。]", " ", text)
    return " ".join(text.split() if lang == "en" else text.replace(" ", ""))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_report_equals_pycocoevalcap(lang):
    references, hypotheses = world_captions(lang)
    gts = {i: [by_hand(r, lang)] for i, r in enumerate(references)}
    res = {i: [by_hand(h, lang)] for i, h in enumerate(hypotheses)}
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider_score, _ = Cider().compute_score(gts, res)
    report = caption_report(references, hypotheses, lang)
    assert report["bleu4"] == bleu_scores[3]
    assert report["cider"] == cider_score
    assert 0 < report["bleu4"] < 1 and 0 < report["cider"] < 10


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer runs Java, not on PATH")
def test_report_equals_pycocoevalcap_with_its_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references, hypotheses = world_captions("en")
    gts = PTBTokenizer().tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
    res = PTBTokenizer().tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider_score, _ = Cider().compute_score(gts, res)
    report = caption_report(references, hypotheses, "en")
    assert report["bleu4"] == bleu_scores[3]
    assert report["cider"] == cider_score


def test_bleu_perfect_and_disjoint():
    refs = [["a large red circle at the top."]]
    assert bleu(refs, ["a large red circle at the top."]) == pytest.approx(1.0)
    # No n-gram in common: BLEU is 0, but for the 1e-15 that pycocoevalcap adds to every matched count.
    disjoint = bleu(refs, ["completely different words here now"])
    assert disjoint < 1e-12
    published, _ = Bleu(4).compute_score({0: ["a large red circle at the top"]},
                                         {0: ["completely different words here now"]}, verbose=0)
    assert disjoint == published[3]


def test_bleu_hand_computed():
    # 6 hypothesis words against 7: clipped n-gram matches 5/6, 3/5, 2/4, 1/3, and a brevity penalty
    ref = "the cat sat on the red mat"
    hyp = "the cat sat on blue mat"
    p = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    expected = math.exp(1 - 7 / 6) * math.exp(sum(math.log(x) for x in p) / 4)
    assert bleu([[ref]], [hyp]) == pytest.approx(expected)


def test_bleu_chinese_counts_characters():
    # 12 distinct characters, one of them (红 -> 蓝) wrong: the n-grams without it match 11/12, 9/11, 7/10, 5/9,
    # and the lengths are equal (no brevity penalty). Scored as words, each caption would be a single token.
    ref = "左上角有一个大的红色圆形。"
    hyp = "左上角有一个大的蓝色圆形。"
    p = [11 / 12, 9 / 11, 7 / 10, 5 / 9]
    assert bleu([[ref]], [hyp], "zh") == pytest.approx(math.exp(sum(math.log(x) for x in p) / 4))


def test_cider_perfect_and_disjoint():
    references, _ = world_captions("en")
    assert cider([[r] for r in references], references) == pytest.approx(10.0)
    assert cider([[r] for r in references], ["nothing alike"] * len(references)) == 0.0
    # Its weights are the references' idf: a word in every reference, such as "a", weighs nothing.
    assert cider([[r] for r in references], ["a"] * len(references)) == 0.0


def test_missing_hypothesis_scores_as_empty():
    references, hypotheses = world_captions("en", count=6)
    hypotheses[2] = None
    expected = caption_report(references, hypotheses[:2] + [""] + hypotheses[3:])
    assert caption_report(references, hypotheses) == expected


def test_attribute_accuracy_counts_missing_shapes_as_wrong():
    ref = "a large red circle at the top left and a small blue star in the center."
    hyp = "a large red square at the top left."
    scores = attribute_accuracy([ref], [hyp])
    assert scores == {"kind": 0.0, "colour": 0.5, "size": 0.5, "position": 0.5}


def test_chinese_report():
    ref = "左上角有一个大的红色圆形。"
    report = caption_report([ref, ref], [ref, "左上角有一个大的蓝色圆形。"], lang="zh")
    assert report["exact_match"] == 0.5 and report["accuracy_colour"] == 0.5 and report["accuracy_kind"] == 1.0
    assert list(report) == ["samples", "exact_match", "bleu4", "cider", "accuracy_kind", "accuracy_colour",
                            "accuracy_size", "accuracy_position"]
    assert exact_match([ref], [None], "zh") == 0.0
