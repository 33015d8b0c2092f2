"""The tiny tier's LLM: a small Llama with a byte-level BPE tokenizer, pre-trained on the world's text.

Its corpus (``xllm/zoo/corpus.py``) mixes the world's documents with copy drills that teach it to read media
spans; the loss is on the answers only, and span contents are tokenised apart, as stage 2 lays them out.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from xllm.processors.batch import IGNORE_INDEX
from xllm.processors.collator import left_padded
from xllm.zoo.corpus import world_documents
from xllm.zoo.loop import Schedule, train

WARMUP_STEPS = 100

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyLLMRecipe:
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 8  # many small heads: copying from the prompt needs several attention patterns at once
    intermediate_size: int = 344
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    tokenizer_documents: int = 20000
    corpus_version: int = 2  # a change in the corpus or its loss means a new LLM (2: <Speech> spans, answers)


MEDIA_SPAN = re.compile(r"<(?P<name>Image|Video|Signal|Speech)>(?P<contents>.*?)</(?P=name)>")


def render_chat(turns: list[tuple[str, str]]) -> str:
    return "".join(f"<|user|>{q}\n<|assistant|>{a}<|end|>\n" for q, a in turns)


def chat_row(tokenizer: PreTrainedTokenizerFast, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Ids and labels of one document laid out by ``render_chat``, the loss on the answers and ``<|end|>`` only.

    A user's turn holds media spans of random words (the copy drills) that no model can predict; their loss
    would drown the answers' signal, which is what teaches reading the prompt. A span's contents are
    tokenised apart from the text around them, as the composite tokenises the text around a medium's slots:
    merged tokens such as ".</" would otherwise teach the LLM span ends that stage 2 never shows it.
    """
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    ids, labels = [], []
    for index, (query, reply) in enumerate(turns):
        separator = "\n" if index else ""  # render_chat's newline after the previous <|end|>
        prompt, start = [], 0
        text = f"{separator}<|user|>{query}\n<|assistant|>"
        for span in MEDIA_SPAN.finditer(text):
            prompt += encode(text[start:span.start("contents")]) + encode(span["contents"])
            start = span.end("contents")
        prompt += encode(text[start:])
        answer = encode(reply) + [tokenizer.eos_token_id]
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    return ids, labels


def train_tokenizer(recipe: TinyLLMRecipe) -> PreTrainedTokenizerFast:
    rng = random.Random(f"tokenizer/{recipe.seed}")
    texts = [render_chat(world_documents(rng)) for _ in range(recipe.tokenizer_documents)]
    # Byte-level BPE: any text (Chinese included) encodes; nothing maps to an unknown token.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>",
                                   bos_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE)


def build_llm(folder: Path, recipe: TinyLLMRecipe = TinyLLMRecipe()) -> None:
    torch.manual_seed(recipe.seed)
    tokenizer = train_tokenizer(recipe)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id))
    rng = random.Random(f"llm/{recipe.seed}")

    def step_loss(step: int) -> torch.Tensor:
        batch = left_padded([chat_row(tokenizer, world_documents(rng)) for _ in range(recipe.batch_size)],
                            tokenizer.pad_token_id)
        return model(**batch).loss

    train("tiny LLM", [model], recipe.steps, Schedule(recipe.lr, WARMUP_STEPS), step_loss, weight_decay=0.01,
          betas=(0.9, 0.98))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
