"""Convert a CTranslate2 Whisper model (``model.bin`` + ``config.json`` + ``tokenizer.json``) to a transformers folder.

The binary is parsed with ``struct`` and numpy (layout version 4 and later: every variable carries its dtype), so the
``ctranslate2`` package is not needed. Usage: ``python -m xllm.models.converters.whisper_ct2 SRC_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                          WhisperProcessor, WhisperTokenizer)

from xllm.common.checkpoint import load_state

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_GELU = 3  # CTranslate2's id for exact (erf) GELU, the only activation Whisper uses
_FIRST_DTYPE_VERSION = 4
_MULTILINGUAL_VOCAB = 51865  # English-only Whisper vocabularies are one token shorter (51864)


@dataclass
class Ct2Model:
    """The contents of a CTranslate2 ``model.bin``; ``variables`` already has every alias resolved."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Reader:
    def __init__(self, buf: bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (size,) = self.unpack("<H")  # UTF-8 length + 1 for the trailing NUL
        raw = self.buf[self.pos:self.pos + size]
        self.pos += size
        if len(raw) != size or raw[-1:] != b"\0":
            raise ValueError(f"{self.path}: malformed string at byte {self.pos - size}")
        return raw[:-1].decode("utf-8")

    def array(self, dtype_id: int, dims: tuple[int, ...], num_bytes: int, name: str) -> np.ndarray:
        if dtype_id not in _DTYPES:
            raise ValueError(f"{self.path}: variable {name} has unknown dtype id {dtype_id}")
        if self.pos + num_bytes > len(self.buf):
            raise ValueError(f"{self.path}: variable {name} runs past the end of the file")
        dtype = _DTYPES[dtype_id]
        raw_dtype = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
        count = num_bytes // np.dtype(raw_dtype).itemsize
        if count != int(np.prod(dims)):
            raise ValueError(f"{self.path}: variable {name} has {count} values for shape {dims}")
        # The data is unaligned and read-only inside the buffer: copy it out.
        data = np.frombuffer(self.buf, raw_dtype, count=count, offset=self.pos).copy().reshape(dims)
        self.pos += num_bytes
        if dtype == "bfloat16":  # bf16 is the top half of a float32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 4 or later) into numpy arrays."""
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    (version,) = reader.unpack("<I")
    if version < _FIRST_DTYPE_VERSION:
        raise ValueError(f"{path}: binary version {version} predates per-variable dtypes (version 4); not supported")
    spec = reader.string()
    (revision, count) = reader.unpack("<II")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = reader.string()
        (rank,) = reader.unpack("<B")
        dims = reader.unpack(f"<{rank}I")
        dtype_id, num_bytes = reader.unpack("<BI")
        variables[name] = reader.array(dtype_id, dims, num_bytes, name)
    (num_aliases,) = reader.unpack("<I")
    aliases = {}
    for _ in range(num_aliases):
        alias, target = reader.string(), reader.string()
        if target not in variables:
            raise ValueError(f"{path}: alias {alias} points to unknown variable {target}")
        aliases[alias] = target
        variables[alias] = variables[target]
    if reader.pos != len(reader.buf):
        raise ValueError(f"{path}: {len(reader.buf) - reader.pos} trailing bytes after the aliases")
    return Ct2Model(version, spec, revision, variables, aliases)


class _Variables:
    """Hands out variables by name and remembers which ones were used, so leftovers can be reported."""

    def __init__(self, variables: Mapping[str, np.ndarray], source: str):
        self.variables, self.source, self.used = variables, source, set()

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.variables:
            raise ValueError(f"{self.source}: variable {name} is missing")
        self.used.add(name)
        return self.variables[name]

    def scalar(self, name: str) -> int:
        return int(self(name).reshape(()))

    def count_layers(self, side: str) -> int:
        return len({m[1] for k in self.variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    def zero_slice(self, name: str, start: int, stop: int) -> None:
        """A k bias that is not zero would be lost: HF's k_proj has no bias."""
        part = self(name)[start:stop]
        if np.any(part != 0):
            raise ValueError(f"{self.source}: {name}[{start}:{stop}] (the k bias) is not all zeros")


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)


def whisper_state_dict(model: Ct2Model, source: str = "model.bin") -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` keys (fused q/k/v are split)."""
    get = _Variables(model.variables, source)
    sd: dict[str, torch.Tensor] = {}

    def linear(ct2: str, hf: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = _t(get(f"{ct2}/weight")), _t(get(f"{ct2}/bias"))

    def norm(ct2: str, hf: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = _t(get(f"{ct2}/gamma")), _t(get(f"{ct2}/beta"))

    def split(ct2: str, hf: str, names: tuple[str, ...]) -> None:
        weight, bias = get(f"{ct2}/weight"), get(f"{ct2}/bias")
        width = weight.shape[0] // len(names)
        for i, name in enumerate(names):
            sd[f"{hf}.{name}.weight"] = _t(weight[i * width:(i + 1) * width])
            if name == "k_proj":
                get.zero_slice(f"{ct2}/bias", i * width, (i + 1) * width)
            else:
                sd[f"{hf}.{name}.bias"] = _t(bias[i * width:(i + 1) * width])

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    sd["model.decoder.embed_tokens.weight"] = _t(get("decoder/embeddings/weight"))
    sd["proj_out.weight"] = _t(get("decoder/projection/weight"))
    for side in ("encoder", "decoder"):
        sd[f"model.{side}.embed_positions.weight"] = _t(get(f"{side}/position_encodings/encodings"))
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(get.count_layers(side)):
            ct2, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            split(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
            linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                split(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
                linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    _check_settings(get)
    leftovers = sorted(set(model.variables) - get.used)
    if leftovers:
        raise ValueError(f"{source}: variables with no place in WhisperForConditionalGeneration: {leftovers}")
    return sd


def _check_settings(get: _Variables) -> None:
    """Scalars that Whisper's architecture fixes; any other value means a model transformers' Whisper cannot run."""
    required = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/alibi": 0,
                "decoder/start_from_zero_embedding": 0}
    for name, value in required.items():
        if name in get.variables and get.scalar(name) != value:
            raise ValueError(f"{get.source}: {name} = {get.scalar(name)}, transformers' Whisper needs {value}")
    # Head counts and scale_embeddings go to the config (whisper_config). The alignment heads come from config.json
    # as a list; these two scalars only say how CTranslate2 averages them.
    get.used.update({"encoder/num_heads", "decoder/num_heads", "decoder/scale_embeddings", "decoder/alignment_heads",
                     "decoder/alignment_layer"} & set(get.variables))


def whisper_config(model: Ct2Model, special: Mapping[str, int], source: str = "model.bin") -> WhisperConfig:
    """A ``WhisperConfig`` whose sizes come from the tensor shapes and whose settings come from the scalars."""
    get = _Variables(model.variables, source)
    conv1 = get("encoder/conv1/weight")
    eot = special["<|endoftext|>"]
    return WhisperConfig(
        vocab_size=get("decoder/embeddings/weight").shape[0], num_mel_bins=conv1.shape[1], d_model=conv1.shape[0],
        encoder_layers=get.count_layers("encoder"), decoder_layers=get.count_layers("decoder"),
        encoder_attention_heads=get.scalar("encoder/num_heads"),
        decoder_attention_heads=get.scalar("decoder/num_heads"),
        encoder_ffn_dim=get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=get("decoder/position_encodings/encodings").shape[0],
        activation_function="gelu", scale_embedding=bool(get.scalar("decoder/scale_embeddings")),
        tie_word_embeddings=model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight",
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=special["<|startoftranscript|>"])


def _special_ids(tokenizer_json: Mapping) -> dict[str, int]:
    return {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}


def whisper_generation_config(ct2_config: Mapping, special: Mapping[str, int], max_length: int,
                              multilingual: bool) -> GenerationConfig:
    """Decoding settings: suppress lists and alignment heads from ``config.json``, special ids from the tokenizer."""
    eot = special["<|endoftext|>"]
    settings = dict(
        decoder_start_token_id=special["<|startoftranscript|>"], bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        no_timestamps_token_id=special["<|notimestamps|>"], prev_sot_token_id=special.get("<|startofprev|>"),
        is_multilingual=multilingual, forced_decoder_ids=None, max_length=max_length,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads", [])],
    )
    if multilingual:
        by_id = {i: t for t, i in special.items()}
        settings["lang_to_id"] = {by_id[i]: i for i in ct2_config.get("lang_ids", [])}
        settings["task_to_id"] = {task: special[f"<|{task}|>"] for task in ("transcribe", "translate")}
    return GenerationConfig(**settings)


def whisper_tokenizer(src_dir: Path, tokenizer_json: Mapping) -> WhisperTokenizer:
    """The tokenizer with every added token after ``<|endoftext|>`` declared special.

    Without that only ``<|endoftext|>`` is special and timestamp decoding is offset by the number of added tokens.
    The timestamp tokens from ``vocabulary.txt`` (when present) are added so the length equals the model's vocabulary.
    """
    eot = _special_ids(tokenizer_json)["<|endoftext|>"]
    extra = [t["content"] for t in sorted(tokenizer_json["added_tokens"], key=lambda t: t["id"]) if t["id"] > eot]
    tokenizer = WhisperTokenizer(tokenizer_file=str(src_dir / "tokenizer.json"), additional_special_tokens=extra)
    vocabulary = src_dir / "vocabulary.txt"
    if vocabulary.is_file():
        # Line i is token i; split on "\n" only so no other line-break character can shift the ids.
        tokens = vocabulary.read_text(encoding="utf-8").rstrip("\n").split("\n")
        tokenizer.add_tokens(tokens[len(tokenizer):])
    return tokenizer


def convert_ct2_whisper(src_dir: str | Path, out_dir: str | Path) -> WhisperForConditionalGeneration:
    """Write ``src_dir`` (CTranslate2 Whisper) to ``out_dir`` as a transformers folder (model, generation config
    and processor, loadable with ``from_pretrained``); returns the model."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    model_bin = src_dir / "model.bin"
    ct2 = read_ct2_model(model_bin)
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"{model_bin}: spec {ct2.spec!r} is not WhisperSpec")
    tokenizer_json = json.loads((src_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ct2_config = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    special = _special_ids(tokenizer_json)
    config = whisper_config(ct2, special, str(model_bin))
    multilingual = config.vocab_size >= _MULTILINGUAL_VOCAB

    with torch.device("meta"):  # every tensor comes from the file, so skip the random initialisation
        model = WhisperForConditionalGeneration(config)
    load_state(model, whisper_state_dict(ct2, str(model_bin)), str(model_bin), assign=True)
    model.tie_weights()  # assign=True gave proj_out its own tensor
    model.generation_config = whisper_generation_config(ct2_config, special, config.max_target_positions, multilingual)
    model.save_pretrained(out_dir)
    tokenizer = whisper_tokenizer(src_dir, tokenizer_json)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins),
                     tokenizer=tokenizer).save_pretrained(out_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="folder with model.bin, config.json and tokenizer.json")
    parser.add_argument("out", type=Path, help="output folder (created)")
    args = parser.parse_args(argv)
    model = convert_ct2_whisper(args.src, args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
