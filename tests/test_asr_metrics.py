import jiwer
import pytest

from xllm.eval.asr_metrics import ErrorCounts, cer, edit_distance, normalize_text, wer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", "hello world"),
        ("  A state-of-the-art   model.  ", "a state of the art model"),
        ("Don't stop \u2014 it's 'fine'", "don't stop it's fine"),
        ("Don\u2019t", "don't"),
        ("\uff28\uff49 there\uff01", "hi there"),  # full-width letters and exclamation mark
    ],
)
def test_normalize_english(text, expected):
    assert normalize_text(text, "en") == expected


def test_normalize_chinese():
    assert normalize_text("你好，世界！ 今天 天气“很好”。", "zh") == "你好世界今天天气很好"
    assert normalize_text("我 爱 AI, 真的?", "zh") == "我爱ai真的"
    with pytest.raises(ValueError, match="fr"):
        normalize_text("bonjour", "fr")


def test_edit_distance_counts():
    assert edit_distance("kitten", "sitting") == ErrorCounts(
        substitutions=2, deletions=0, insertions=1, reference_length=6
    )
    assert edit_distance([], ["a", "b"]) == ErrorCounts(0, 0, 2, 0)
    assert edit_distance(["a", "b"], []) == ErrorCounts(0, 2, 0, 2)
    assert edit_distance("abc", "abc") == ErrorCounts(0, 0, 0, 3)
    # "the cat sat" -> "cat sat down": delete "the", insert "down".
    assert edit_distance("the cat sat".split(), "cat sat down".split()) == ErrorCounts(0, 1, 1, 3)


def test_wer_corpus_level():
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sit on mat", "hello world"]
    rate, counts = wer(refs, hyps)
    # One substitution (sat->sit), one deletion (the), over 8 reference words.
    assert counts == ErrorCounts(1, 1, 0, 8)
    assert rate == pytest.approx(2 / 8)


def test_missing_hypotheses_count_as_deletions():
    rate, counts = wer(["a b c", "d e"], ["a b c", None])
    assert counts == ErrorCounts(0, 2, 0, 5)
    assert rate == pytest.approx(2 / 5)
    rate, counts = cer(["你好", "世界"], ["", "世界"])
    assert counts.deletions == 2 and rate == pytest.approx(0.5)


def test_cer_ignores_spaces_and_counts_insertions():
    rate, counts = cer(["我 爱 北 京"], ["我爱北京天安门"])
    assert counts == ErrorCounts(0, 0, 3, 4)
    assert rate == pytest.approx(0.75)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        cer(["a"], [])


def test_empty_reference_corpus():
    assert wer([""], [""])[0] == 0.0
    assert wer([""], ["extra"])[0] == float("inf")


def test_counts_equal_jiwer():
    refs = ["the cat sat on the mat", "hello world", "a state of the art model"]
    hyps = ["the cat sit on mat", "hello there world", "state of art models"]
    out = jiwer.process_words(refs, hyps)
    rate, counts = wer(refs, hyps)
    assert counts == ErrorCounts(out.substitutions, out.deletions, out.insertions, 6 + 2 + 6)
    assert rate == pytest.approx(jiwer.wer(refs, hyps))
    # Without spaces, jiwer's own CER counts the same characters as xllm's.
    refs, hyps = ["我爱北京天安门", "今天天气很好"], ["我爱北京天门", "今天天汽很好吗"]
    assert cer(refs, hyps)[0] == pytest.approx(jiwer.cer(refs, hyps))


def test_english_cer_does_not_count_spaces():
    # One substitution (c -> b) over the 6 characters of "the cat"; jiwer's CER would count the space (1 / 7).
    rate, counts = cer(["the cat"], ["the bat"])
    assert counts == ErrorCounts(1, 0, 0, 6)
    assert rate == pytest.approx(1 / 6)


def test_equal_cost_alignments_keep_the_total():
    # "a b" -> "b a" costs 2 either way: two substitutions, or a deletion and an insertion.
    counts = edit_distance("a b".split(), "b a".split())
    assert counts.errors == 2 and counts.reference_length == 2


def test_empty_reference_among_others():
    # The empty reference's hypothesis word is an insertion; the other utterance is right: 1 error over 2 words.
    rate, counts = wer(["", "a b"], ["extra", "a b"])
    assert counts == ErrorCounts(0, 0, 1, 2)
    assert rate == pytest.approx(0.5)
