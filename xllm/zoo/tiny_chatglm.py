"""The tiny tier's ChatGLM: a SentencePiece vocabulary and a small GLM pre-trained on the world's Chinese text.

The folder it writes is a ChatGLM-6B checkpoint in miniature (``config.json``, ``model.safetensors`` in the
original key layout, ``ice_text.model`` and ``tokenizer_config.json``), so the ``chatglm`` backend loads it
with the same code that loads the real model. The vocabulary keeps ChatGLM's special pieces, only at other
ids; the tokenizer finds them by name and the config records the same ids.

Pre-training uses X-LLM's prompt layout, ``问：{query}\\n答：`` [gMASK] <sop> answer <eop>, with the loss on
the answer and <eop> only (the context attends bidirectionally, so it cannot be predicted). Like the English
tiny LLM (see ``xllm/zoo/corpus.py``) it reads captions asked for without an image and captions given inside
an image span that the answer repeats, plus questions about the shape at one position of such a caption. The
span's contents are tokenised apart from the text around them, exactly as the composite tokenises the text
around ``<ImageHere>``, so that stage 2 only has to replace those tokens with the interface's embeddings.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn

from xllm.world.scenes import ATTRIBUTES, COLOUR_ZH, KIND_ZH, POSITION_ZH, SIZE_ZH, Scene, sample_scene
from xllm.world.scenes import caption as scene_caption
from xllm.models.llm.chatglm import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from xllm.models.llm.chatglm_backend import ChatGLMBackend
from xllm.models.llm.chatglm_tokenizer import MAX_BLANK_LENGTH
from xllm.processors.collator import left_padded, marker, media_span
from xllm.zoo.loop import Schedule, train

TOKENIZER_FILE = "ice_text.model"
# ChatGLM-6B's own special pieces: control pieces vanish when decoded, user-defined ones are matched whole.
CONTROL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>")
USER_PIECES = ("<n>", "<|tab|>", *(f"<|blank_{k}|>" for k in range(2, MAX_BLANK_LENGTH + 1)))

DESCRIBE_ZH = ("请描述这张图片。", "描述这张图片。", "图片里有什么？")
DESCRIBE_EN = ("Describe the image.", "What is in the picture?")
IMAGE_MARKER = marker("image")
LOOKS = tuple(name for name in ATTRIBUTES if name != "position")  # what an alike scene's shapes share but one of


@dataclass(frozen=True)
class TinyChatGLMRecipe:
    # Stage 2 depends on the build as much as on the recipe: after 12 epochs the Chinese stage 2 reads kind/colour at
    # 64/70 % with seed 0, 77/82 % with seed 1 (docs/chatglm.md lists the builds).
    seed: int = 1
    vocab_size: int = 1024  # an upper bound: the world's text needs fewer pieces, and training keeps what it finds
    # Chinese has no spaces to cut at: longer pieces would swallow whole "position + size + colour + kind"
    # phrases, one id per combination, which an interface could never compose from attributes.
    max_piece_length: int = 3
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 8  # many small heads: copying from the prompt needs several attention patterns at once
    inner_hidden_size: int = 512
    # Copying from the span appears abruptly, between steps 1,000 and 1,600: before it the loss sits near 1.0
    # and kinds are guessed from their priors (chance in stage 2); shuffled spans need longer after it.
    steps: int = 3600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    init_std: float = 0.02
    drill_share: float = 0.45  # copy drills: random strings of the world's words in a span, repeated
    copy_share: float = 0.3  # documents whose answer repeats a caption given in an image span
    lookup_share: float = 0.15  # documents asking for the shape at one position of a caption in an image span
    # Copy documents whose span lists the shapes in another order than the answer, which has to find each shape
    # by its position word, as it must in an interface's query vectors (docs/chatglm.md).
    shuffle_share: float = 0.5
    # Scenes whose shapes differ in one attribute only: filling in the next shape from the shapes the answer
    # already wrote is then wrong, so only reading the span pays (docs/chatglm.md).
    alike_share: float = 0.5
    english_share: float = 0.0  # the LLM reads Chinese; English costs steps that the Chinese stage 2 needs
    tokenizer_english_share: float = 0.3  # the vocabulary covers both of the world's languages
    tokenizer_documents: int = 20000


@dataclass(frozen=True)
class Document:
    """One round: ``query`` may hold the image marker, which ``span_text`` replaces."""

    query: str
    answer: str
    span_text: str | None = None

    def text(self) -> str:
        return self.query.replace(IMAGE_MARKER, self.span_text or "")


WORDS_ZH = (*COLOUR_ZH.values(), *KIND_ZH.values(), *POSITION_ZH.values(), *SIZE_ZH.values(), "有一个", "的", "，")


def copy_drill(rng: random.Random) -> Document:
    """Random strings of the world's Chinese words cannot be guessed, only read: they grow the copying heads
    (see ``xllm/zoo/corpus.py``)."""
    words = "".join(rng.choice(WORDS_ZH) for _ in range(rng.randint(2, 10)))
    return Document(f"{media_span('image')}{rng.choice(DESCRIBE_ZH)}", words, span_text=words)


def world_document(rng: random.Random, recipe: TinyChatGLMRecipe, english_share: float) -> Document:
    """A copy drill, a copy document, a lookup document (Chinese only) or a caption asked for without an image,
    in the recipe's shares."""
    if rng.random() < recipe.drill_share:
        return copy_drill(rng)
    copy_share, lookup_share = (share / (1 - recipe.drill_share) for share in (recipe.copy_share, recipe.lookup_share))
    scene = sample_scene(rng)
    if rng.random() < recipe.alike_share:
        scene = alike(scene, rng)
    english = rng.random() < english_share
    lang = "en" if english else "zh"
    caption = scene_caption(scene, lang)
    question = rng.choice(DESCRIBE_EN if english else DESCRIBE_ZH)
    draw = rng.random()
    if draw < copy_share:
        span = caption
        if rng.random() < recipe.shuffle_share:
            # The shapes in another order: the answer has to find each one by its position word, as it must in
            # an interface's query vectors, which are a set (see docs/chatglm.md).
            span = scene_caption(Scene(tuple(rng.sample(scene.shapes, len(scene.shapes)))), lang)
        return Document(f"{media_span('image')}{' ' if english else ''}{question}", caption, span_text=span)
    if draw < copy_share + lookup_share and not english:
        # One shape's attributes, found by its position: the reading that copying a caption of several shapes
        # needs, where "有一个" starts every shape and the previous token cannot tell them apart.
        shape = rng.choice(scene.shapes)
        answer = f"一个{SIZE_ZH[shape.size]}的{COLOUR_ZH[shape.colour]}{KIND_ZH[shape.kind]}。"
        return Document(f"{media_span('image')}{POSITION_ZH[shape.position]}有什么？", answer, span_text=caption)
    return Document(question, caption)


def alike(scene: Scene, rng: random.Random) -> Scene:
    """The scene with every shape's attributes but one (and its position) set to the first shape's."""
    first, varying = scene.shapes[0], rng.choice(LOOKS)
    shared = {name: getattr(first, name) for name in LOOKS if name != varying}
    return Scene(tuple(replace(shape, **shared) for shape in scene.shapes))


def train_tokenizer(recipe: TinyChatGLMRecipe, folder: Path) -> ChatGLMTokenizer:
    """A unigram SentencePiece model with ChatGLM's normaliser, byte fallback and special pieces."""
    rng = random.Random(f"chatglm-tokenizer/{recipe.seed}")
    texts = [f"问：{doc.text()}<n>答：{doc.answer}"
             for doc in (world_document(rng, recipe, recipe.tokenizer_english_share)
                         for _ in range(recipe.tokenizer_documents))]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        prefix = Path(scratch) / "ice_text"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(prefix), model_type="unigram",
            vocab_size=recipe.vocab_size, hard_vocab_limit=False, max_sentencepiece_length=recipe.max_piece_length,
            character_coverage=1.0, byte_fallback=True,
            split_digits=True, normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            pad_piece="<pad>", control_symbols=list(CONTROL_PIECES), user_defined_symbols=list(USER_PIECES))
        (folder / TOKENIZER_FILE).write_bytes(prefix.with_suffix(".model").read_bytes())
    settings = {"num_image_tokens": 0, "remove_space": False, "do_lower_case": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return ChatGLMTokenizer.from_pretrained(folder)


def model_config(recipe: TinyChatGLMRecipe, tokenizer: ChatGLMTokenizer) -> dict:
    """A ``config.json`` in ChatGLM-6B's format whose special ids are the tokenizer's."""
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "vocab_size": tokenizer.vocab_size, "hidden_size": recipe.hidden_size, "num_layers": recipe.num_layers,
        "num_attention_heads": recipe.num_heads, "inner_hidden_size": recipe.inner_hidden_size,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "mask_token_id": tokenizer.mask_token_id, "gmask_token_id": tokenizer.gmask_token_id,
        "pad_token_id": tokenizer.pad_token_id, "max_sequence_length": 2048, "position_encoding_2d": True,
        "use_cache": True,
    }


def document_row(backend: ChatGLMBackend, doc: Document) -> tuple[list[int], list[int]]:
    """Ids and labels of one document, the span's text tokenised on its own like a medium's slots."""
    before, *after = backend.layout.format_prompt(doc.query).split(IMAGE_MARKER)
    prompt = backend.layout.tokenize(before)
    if after:
        prompt += backend.layout.tokenize(doc.span_text) + backend.layout.tokenize(after[0])
    return backend.layout.build_sequence(prompt, doc.answer)


def build_chatglm_llm(folder: Path, recipe: TinyChatGLMRecipe = TinyChatGLMRecipe()) -> None:
    torch.manual_seed(recipe.seed)
    tokenizer = train_tokenizer(recipe, folder)
    model = ChatGLMForConditionalGeneration.from_config(model_config(recipe, tokenizer), device="cpu")
    # PyTorch's default N(0, 1) embedding would start the tied output layer at logits of std ~sqrt(hidden).
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=recipe.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    backend = ChatGLMBackend(model, tokenizer)
    rng = random.Random(f"chatglm-llm/{recipe.seed}")

    def step_loss(step: int) -> torch.Tensor:
        rows = [document_row(backend, world_document(rng, recipe, recipe.english_share))
                for _ in range(recipe.batch_size)]
        batch = left_padded(rows, tokenizer.pad_token_id)
        return backend(batch["input_ids"], backend.embed(batch["input_ids"]), batch["attention_mask"],
                       batch["labels"]).loss

    # The first warm-up step at rate 0: the schedule every tiny ChatGLM build so far was made with.
    train("tiny ChatGLM", [model], recipe.steps, Schedule(recipe.lr, recipe.warmup_steps, warmup_from_zero=True),
          step_loss, weight_decay=0.01, betas=(0.9, 0.98))
    model.save_pretrained(folder)
