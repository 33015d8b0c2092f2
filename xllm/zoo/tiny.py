"""The tiny tier: a small LLM and a small ViT, pre-trained on the synthetic world and then frozen.

Both are ordinary ``save_pretrained`` folders under ``<cache>/zoo/tiny/``, loaded by the same code that loads
real checkpoints. Building is deterministic (fixed seeds, single process) and cached: a folder is rebuilt only
when its recipe changes.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from xllm.common.paths import cache_dir
from xllm.world.render import RENDER_VERSION, render
from xllm.world.scenes import COLOURS, KINDS, POSITIONS, SIZES, sample_scene
from xllm.models.llm.base import IGNORE_INDEX
from xllm.processors.image import ImageProcessor
from xllm.zoo.corpus import world_documents
from xllm.zoo.loop import Schedule, StepLoss, train
from xllm.zoo.text_tokenizer import TinyTextTokenizerRecipe, build_text_tokenizer
from xllm.zoo.speech import TinySpeechEncoderRecipe, build_speech_encoder
from xllm.zoo.tiny_chatglm import TinyChatGLMRecipe, build_chatglm_llm, left_padded

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class TinyEncoderRecipe:
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    render_version: int = RENDER_VERSION  # a change in drawing means a new encoder


def zoo_dir() -> Path:
    return cache_dir() / "zoo" / "tiny"


def _is_built(folder: Path, recipe) -> bool:
    marker = folder / "recipe.json"
    return marker.is_file() and json.loads(marker.read_text()) == asdict(recipe)


def _mark_built(folder: Path, recipe) -> None:
    (folder / "recipe.json").write_text(json.dumps(asdict(recipe)))


# --------------------------------------------------------------------------- LLM


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

    ids: list[int] = []
    labels: list[int] = []
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
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(f"llm/{recipe.seed}")

    def step_loss(step: int) -> torch.Tensor:
        batch = left_padded([chat_row(tokenizer, world_documents(rng)) for _ in range(recipe.batch_size)],
                            tokenizer.pad_token_id)
        return model(**batch).loss

    model.train()
    train("tiny LLM", params, optimizer, recipe.steps, Schedule(recipe.lr, WARMUP_STEPS), step_loss)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _mark_built(folder, recipe)


# --------------------------------------------------------------------------- image encoder


class GridProbe(nn.Module):
    """Reads each grid cell's shape (colour, kind, size, or empty) from the ViT's tokens.

    One learned attention query per cell pools the tokens, so the ViT must keep where each shape is as well as
    what it is: what a captioner needs from a frozen encoder. The probe is discarded after pre-training.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        cells = len(POSITIONS)
        self.pool = nn.Linear(width, cells)
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.kind = nn.Linear(width, len(KINDS) + 1)
        self.size = nn.Linear(width, len(SIZES) + 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = self.pool(tokens).softmax(dim=1)  # [N, S, cells]
        cells = torch.einsum("nsc,nsd->ncd", weights, tokens)
        return self.colour(cells), self.kind(cells), self.size(cells)


def grid_labels(scene) -> torch.Tensor:
    """[cells, 3] class ids (colour, kind, size); 0 means the cell is empty."""
    labels = torch.zeros(len(POSITIONS), 3, dtype=torch.long)
    for shape in scene.shapes:
        cell = POSITIONS.index(shape.position)
        labels[cell] = torch.tensor([COLOURS.index(shape.colour) + 1, KINDS.index(shape.kind) + 1,
                                     SIZES.index(shape.size) + 1])
    return labels


def build_image_encoder(folder: Path, recipe: TinyEncoderRecipe = TinyEncoderRecipe()) -> None:
    torch.manual_seed(recipe.seed)
    config = Blip2VisionConfig(
        image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size, initializer_range=0.02)
    model = Blip2VisionModel(config)
    probe = GridProbe(recipe.hidden_size)
    processor = ImageProcessor(recipe.image_size)
    params = list(model.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.05)
    rng = random.Random(f"encoder/{recipe.seed}")

    def step_loss(step: int) -> StepLoss:
        scenes = [sample_scene(rng) for _ in range(recipe.batch_size)]
        pixels = torch.stack([processor(render(s, recipe.image_size, rng)) for s in scenes])
        labels = torch.stack([grid_labels(s) for s in scenes])
        logits = probe(model(pixel_values=pixels).last_hidden_state)
        loss = sum(F.cross_entropy(l.flatten(0, 1), labels[..., i].flatten()) for i, l in enumerate(logits))
        accuracy = (logits[1].argmax(-1) == labels[..., 1]).float().mean().item()
        return loss, {"cell-kind acc": accuracy}

    model.train()
    train("tiny image encoder", params, optimizer, recipe.steps, Schedule(recipe.lr, WARMUP_STEPS), step_loss)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(folder)
    _mark_built(folder, recipe)


COMPONENTS = {
    # name -> (recipe, builder): every folder ``zoo:tiny/<name>`` a config may name.
    "llm": (TinyLLMRecipe(), build_llm),
    "image_encoder": (TinyEncoderRecipe(), build_image_encoder),
    "text_tokenizer": (TinyTextTokenizerRecipe(), build_text_tokenizer),
    "speech_encoder": (TinySpeechEncoderRecipe(), build_speech_encoder),
    "chatglm_llm": (TinyChatGLMRecipe(), build_chatglm_llm),
}


def build(names: list[str] | None = None, force: bool = False) -> Path:
    """Builds the named components (all by default) that are missing or stale; returns the tier's folder."""
    root = zoo_dir()
    for name in names or list(COMPONENTS):
        if name not in COMPONENTS:
            raise KeyError(f"zoo:tiny has no component {name!r}; known: {', '.join(COMPONENTS)}")
        recipe, builder = COMPONENTS[name]
        folder = root / name
        if force or not _is_built(folder, recipe):
            log.info("building zoo:tiny/%s in %s", name, folder)
            builder(folder, recipe)
    return root


def missing(names: list[str]) -> list[str]:
    """The named components whose folders are absent or were built by another recipe."""
    return [n for n in names if n not in COMPONENTS or not _is_built(zoo_dir() / n, COMPONENTS[n][0])]
