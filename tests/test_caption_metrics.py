import math

import pytest

from xllm.eval.caption_metrics import attribute_accuracy, bleu, caption_report, exact_match


def test_bleu_perfect_and_disjoint():
    refs = [["a large red circle at the top."]]
    assert bleu(refs, ["a large red circle at the top."]) == pytest.approx(1.0)
    assert bleu(refs, ["completely different words here now"]) == 0.0


def test_bleu_hand_computed():
    # 6 hypothesis words against 7: clipped n-gram matches 5/6, 3/5, 2/4, 1/3, and a brevity penalty
    ref = "the cat sat on the red mat"
    hyp = "the cat sat on blue mat"
    p = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    expected = math.exp(1 - 7 / 6) * math.exp(sum(math.log(x) for x in p) / 4)
    assert bleu([[ref]], [hyp]) == pytest.approx(expected)


def test_attribute_accuracy_counts_missing_shapes_as_wrong():
    ref = "a large red circle at the top left and a small blue star in the center."
    hyp = "a large red square at the top left."
    scores = attribute_accuracy([ref], [hyp])
    assert scores == {"kind": 0.0, "colour": 0.5, "size": 0.5, "position": 0.5}


def test_chinese_report():
    ref = "左上角有一个大的红色圆形。"
    report = caption_report([ref, ref], [ref, "左上角有一个大的蓝色圆形。"], lang="zh")
    assert report["exact_match"] == 0.5 and report["accuracy_colour"] == 0.5 and report["accuracy_kind"] == 1.0
    assert exact_match([ref], [None], "zh") == 0.0
