"""ChatGLM-6B tokenizer on the real ice_text.model: the spec's documented ids, whitespace handling, special
tokens, round trips, the padded prefix-LM layout, and the original tokenizer's ids on texts holding special pieces
(``data/chatglm_tokenizer_cases.json``, produced by running the original; its header says how)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xllm.models.llm.chatglm import ChatGLMTokenizer, prefix_lm_layout

GMASK, SOP, EOP, PAD, TAB, BLANK_2 = 130001, 130004, 130005, 3, 130008, 130009
MASK, UNK = 130000, 0
ORIGINAL_CASES = json.loads((Path(__file__).parent / "data" / "chatglm_tokenizer_cases.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def tokenizer(shared_dir):
    model_file = shared_dir / "assets" / "chatglm6b" / "ice_text.model"
    if not model_file.is_file():
        pytest.skip(f"{model_file} is absent: ChatGLM-6B's tokenizer model is not on this machine")
    return ChatGLMTokenizer.from_pretrained(model_file.parent)


def blank(k: int) -> int:
    return BLANK_2 + k - 2


def test_special_token_ids(tokenizer):
    assert tokenizer.vocab_size == 130344
    assert (tokenizer.unk_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (0, 2, PAD)
    assert (tokenizer.mask_token_id, tokenizer.gmask_token_id) == (130000, GMASK)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (SOP, EOP)
    assert tokenizer.sp.id_to_piece(TAB) == "<|tab|>" and tokenizer.sp.id_to_piece(blank(80)) == "<|blank_80|>"


def test_documented_examples(tokenizer):
    assert tokenizer.encode("你好") == [5, 74874, GMASK, SOP]
    assert tokenizer.encode("a\nb") == [104, 4, 178, GMASK, SOP]
    assert blank(4) == 130011 and 130011 in tokenizer.encode("x = 1;    y = 2")
    assert tokenizer.tokenize("：") == tokenizer.tokenize(":")


@pytest.mark.parametrize("k", [2, 3, 7, 33, 80])
def test_space_runs_become_blank_tokens(tokenizer, k):
    text = "a" + " " * k + "b"
    ids = tokenizer.tokenize(text)
    assert blank(k) in ids and 5 not in ids[1:]
    assert tokenizer.decode(ids) == text


def test_space_runs_longer_than_80(tokenizer):
    assert tokenizer.tokenize("a" + " " * 85 + "b")[1:3] == [blank(80), blank(5)]
    assert tokenizer.tokenize("a" + " " * 160 + "b")[1:3] == [blank(80), blank(80)]
    for k in (81, 85, 160, 163):
        text = "a" + " " * k + "b"
        assert tokenizer.decode(tokenizer.tokenize(text)) == text


def test_tabs_and_newlines(tokenizer):
    text = "def f(x):\n\treturn x\n\n\n  # done"
    ids = tokenizer.tokenize(text)
    assert ids.count(4) == 4 and ids.count(TAB) == 1 and blank(2) in ids
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", [
    "Hello, world! This is ChatGLM-6B.",
    "你好，请介绍一下你自己。",
    "混合 mixed 文本 with numbers 12345 and 3.14",
    "emoji 🙂 and rare ꙮ characters",  # the rare one falls back to byte pieces
    "多行\n文本\n\n结束",
])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text.replace("，", ",")


def test_rare_characters_use_byte_pieces(tokenizer):
    ids = tokenizer.tokenize("ꙮ")
    assert len(ids) == 4 and all(130088 <= i < 130344 for i in ids[1:])


def test_normalisation_is_nfkc_and_single_edge_spaces_vanish(tokenizer):
    assert tokenizer.tokenize("你好，世界！") == tokenizer.tokenize("你好,世界!")
    assert tokenizer.decode(tokenizer.tokenize("１２３：ＡＢ")) == "123:AB"
    assert tokenizer.tokenize(" hello ") == tokenizer.tokenize("hello")


def test_special_tokens_single_and_pair(tokenizer):
    a, b = tokenizer.tokenize("问题"), tokenizer.tokenize("回答")
    assert tokenizer.encode("问题") == a + [GMASK, SOP]
    assert tokenizer.encode("问题", "回答") == a + [GMASK, SOP] + b + [EOP]
    assert tokenizer.encode("问题", add_special_tokens=False) == a


def test_special_pieces_in_text(tokenizer):
    """The original's special tokens become their ids, and the whitespace next to them goes; other control
    pieces, such as [gMASK], are ordinary text there."""
    assert tokenizer.tokenize("a  <sop>\n b") == [104, SOP, 463]
    assert tokenizer.tokenize("<sop><eop>[MASK]<pad><unk>") == [SOP, EOP, MASK, PAD, UNK]
    assert tokenizer.encode("<sop>") == [SOP, GMASK, SOP]
    assert tokenizer.tokenize("[gMASK]") == tokenizer.sp.encode("[gMASK]") == [53, 199, 15475, 42]
    assert SOP not in tokenizer.tokenize("<SOP> <so p>")


@pytest.mark.parametrize("text", ["", " hello ", "x = 1;    y = 2", "def f(x):\n\treturn x", "你好，世界！🙂",
                                  "[gMASK] </s> <ENC>"])
def test_text_without_special_pieces_is_one_sentencepiece_call(tokenizer, text):
    assert tokenizer.tokenize(text) == tokenizer.sp.encode(tokenizer.preprocess(text))


@pytest.mark.parametrize("case", ORIGINAL_CASES["cases"],
                         ids=[f"{i}-{case['text'][:20]!r}" for i, case in enumerate(ORIGINAL_CASES["cases"])])
def test_matches_the_original_tokenizer(tokenizer, case):
    text = case["text"]
    assert tokenizer.tokenize(text) == case["ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == case["ids"]
    assert tokenizer.encode(text) == case["ids_with_special_tokens"]
    assert tokenizer.decode(case["ids_with_special_tokens"]) == case["decoded"]


def test_decode_drops_pads_and_control_tokens(tokenizer):
    ids = tokenizer.encode("今天", "晴天")  # the pair's dummy-prefix "▁" decodes to a space
    assert tokenizer.decode([PAD, PAD] + ids) == "今天 晴天"
    assert tokenizer.decode(torch.tensor(ids)) == "今天 晴天"
    with pytest.raises(ValueError, match="130400"):
        tokenizer.decode([5, 130400])


def test_left_padded_batch(tokenizer):
    texts = ["你好", "Hello there, how are you today?\n  Fine."]
    batch = tokenizer(texts, padding=True)
    rows = [tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    assert batch["input_ids"].tolist() == [[PAD] * (width - len(r)) + r for r in rows]
    mask, positions = batch["attention_mask"], batch["position_ids"]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, width, width) and positions.shape == (2, 2, width)
    for i, row in enumerate(rows):
        pads = width - len(row)
        alone_mask, alone_positions = prefix_lm_layout(torch.tensor([row]), None, mask_token_id=130000,
                                                       gmask_token_id=GMASK, bos_token_id=SOP)
        assert torch.equal(mask[i, :, pads:, pads:], alone_mask[0])
        assert mask[i, :, :pads].all() and mask[i, :, :, :pads].all()
        assert torch.equal(positions[i, :, pads:], alone_positions[0])
        assert not positions[i, :, :pads].any()
    # "你好" = [5, 74874, gMASK, sop]: context 3, mask position 2
    assert positions[0, :, -4:].tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]


def test_unpadded_call_returns_ids_only(tokenizer):
    encoded = tokenizer("你好")
    assert list(encoded) == ["input_ids"] and encoded["input_ids"].tolist() == [[5, 74874, GMASK, SOP]]


def test_layout_reproduces_the_original_padding(shared_dir):
    """Case C of the oracle: masks and positions the original tokenizer's padding produced (ids remapped)."""
    ref = load_file(shared_dir / "oracles" / "chatglm6b_tiny" / "reference_outputs.safetensors")
    ids = ref["C.input_ids"]
    mask, positions = prefix_lm_layout(ids, (ids != PAD).long(), mask_token_id=900, gmask_token_id=901,
                                       bos_token_id=904)
    assert torch.equal(mask, ref["C.attention_mask"]) and torch.equal(positions, ref["C.position_ids"])


def test_layout_with_mask_token_and_errors():
    ids = torch.tensor([[10, 11, 130000, 12, 13, SOP, 20]])  # the spec's [MASK] example
    _, positions = prefix_lm_layout(ids, None, mask_token_id=130000, gmask_token_id=GMASK, bos_token_id=SOP)
    assert positions.tolist() == [[[0, 1, 2, 3, 4, 2, 2], [0, 0, 0, 0, 0, 1, 2]]]
    with pytest.raises(ValueError, match="no <sop>"):
        prefix_lm_layout(ids[:, :5], None, mask_token_id=130000, gmask_token_id=GMASK, bos_token_id=SOP)
    with pytest.raises(ValueError, match="left padding"):
        prefix_lm_layout(ids, torch.tensor([[1, 1, 1, 1, 1, 1, 0]]), mask_token_id=130000, gmask_token_id=GMASK,
                         bos_token_id=SOP)
