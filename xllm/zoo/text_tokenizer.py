"""The tiny tier's tokenizer for the Q-Former's text branch: word-level, trained on the world's text.

The world's language has a few dozen English words and Chinese characters, so whole words (and single Chinese
characters, split by BERT's normaliser) make the shortest sequences; BERT's special tokens make it a drop-in
for the bert-base-uncased tokenizer BLIP-2 uses at full size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from xllm.models.interfaces.qformer_text import DECODE_TOKEN
from xllm.zoo.corpus import conversations

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", DECODE_TOKEN]


@dataclass(frozen=True)
class TinyTextTokenizerRecipe:
    seed: int = 0
    documents: int = 20000


def build_text_tokenizer(folder: Path, recipe: TinyTextTokenizerRecipe = TinyTextTokenizerRecipe()) -> None:
    rng = random.Random(f"text_tokenizer/{recipe.seed}")
    texts = [f"{user} {answer}" for _ in range(recipe.documents) for user, answer in conversations(rng)]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS,
                                                                    show_progress=False))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", bos_token=DECODE_TOKEN).save_pretrained(folder)
