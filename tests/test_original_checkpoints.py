"""``model.pretrained``: tiny random checkpoints in the LAVIS, X-LLM and Hugging Face layouts, loaded into the real
composite at build time, give the outputs of the modules that wrote them."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_convert_blip2 import (
    IMAGE,
    MAX_POS,
    PATCH,
    QF_FFN,
    QF_HEADS,
    QF_LAYERS,
    QF_WIDTH,
    QUERIES,
    VIT_DEPTH,
    VIT_HEADS,
    VIT_MLP,
    VIT_WIDTH,
    VOCAB,
    LavisBlip2,
    qformer_config,
    stage2_dict,
    vision_config,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, PreTrainedTokenizerFast

from xllm.common.config import ConfigError
from xllm.models.config import resolve_model
from xllm.models.builder import build_model
from xllm.processors.collator import CaptionTokens
from xllm.models.pretrained import load_pretrained

TOL = 1e-4
ENCODER = dict(name="blip2_vision", path=None, image_size=IMAGE, patch_size=PATCH, hidden_size=VIT_WIDTH,
               num_hidden_layers=VIT_DEPTH, num_attention_heads=VIT_HEADS, intermediate_size=VIT_MLP)
QFORMER = dict(name="qformer", num_query_tokens=QUERIES, hidden_size=QF_WIDTH, num_hidden_layers=QF_LAYERS,
               num_attention_heads=QF_HEADS, intermediate_size=QF_FFN, cross_attention_frequency=2, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm_width(micro_zoo) -> int:
    return OmegaConf.load(micro_zoo["llm"] / "config.json")["hidden_size"]


@pytest.fixture(scope="module")
def lavis(tmp_path_factory, llm_width: int) -> tuple[LavisBlip2, Path]:
    """A LAVIS BLIP-2 whose ``opt_proj`` fits the micro LLM, saved as LAVIS and X-LLM release files."""
    torch.manual_seed(0)
    ref = LavisBlip2()
    ref.opt_proj = nn.Linear(QF_WIDTH, llm_width)
    ref.eval()
    folder = tmp_path_factory.mktemp("originals")
    torch.save(ref.visual_encoder.state_dict(), folder / "eva_vit_g.pth")
    stage1 = {k: v for k, v in ref.state_dict().items() if not k.startswith(("visual_encoder.", "opt_proj."))}
    torch.save({"model": stage1}, folder / "blip2_pretrained.pth")
    torch.save({"model": stage2_dict(ref)}, folder / "blip2_pretrained_opt.pth")
    rotary = {"opt_model.transformer.layers.0.attention.rotary_emb.inv_freq": torch.ones(4).half()}
    torch.save({"model": stage2_dict(ref) | rotary, "epoch": 1}, folder / "xllm_image.pth")
    return ref, folder


def model_cfg(micro_zoo, interface: dict, pretrained: list[Path]) -> dict:
    return {"arch": "xllm", "model_type": "tiny", "llm": {"backend": "hf_causal", "path": str(micro_zoo["llm"])},
            "modalities": {"image": {"encoder": ENCODER, "interface": interface}},
            "pretrained": [str(p) for p in pretrained]}


def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert (actual - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("stage2_file", ["blip2_pretrained_opt.pth", "xllm_image.pth"])
def test_lavis_and_xllm_files_build_the_same_model(micro_zoo, lavis, stage2_file: str) -> None:
    ref, folder = lavis
    model = build_model(resolve_model(model_cfg(micro_zoo, QFORMER, [folder / "eva_vit_g.pth", folder / stage2_file])))
    assert model.encoders["image"].model.post_layernorm.eps == 1e-5  # LAVIS's ln_vision, from the report
    pixels = images()
    with torch.no_grad():
        assert_close(model.encoders["image"](pixels)[0], ref.image_features(pixels))
        assert_close(torch.stack(model.modality("image")(pixels)), ref.opt_proj(ref.qformer(pixels)))


def test_lavis_stage1_file_fills_the_text_branch(micro_zoo, lavis, tmp_path: Path) -> None:
    ref, folder = lavis
    words = [f"w{i}" for i in range(VOCAB - 6)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                     ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", bos_token="[DEC]").save_pretrained(tmp_path)
    interface = {**QFORMER, "name": "qformer_text", "tokenizer": str(tmp_path), "max_position_embeddings": MAX_POS,
                 "max_text_length": 8, "embed_dim": ref.vision_proj.out_features}
    cfg = model_cfg(micro_zoo, interface, [folder / "eva_vit_g.pth", folder / "blip2_pretrained.pth"])
    model = build_model(resolve_model(cfg))
    qformer = model.interfaces["image"]
    captions = CaptionTokens(qformer.tokenizer, qformer.max_text_length)(["w3 w7 w1", "w5 w2 w9"])
    ids, mask = captions["input_ids"], captions["attention_mask"]
    pixels = images()
    with torch.no_grad():
        features, feature_mask = model.encoders["image"](pixels)
        assert_close(qformer.matching_states(features, feature_mask, ids, mask), ref.qformer(pixels, ids)[:, :QUERIES])
    assert torch.equal(qformer.itm_head.weight, ref.itm_head.weight) and torch.equal(qformer.temp, ref.temp)
    assert torch.equal(qformer.lm_head.decoder.bias, ref.Qformer.cls.predictions.bias)
    # Reported, not hidden: the stage-1 file has no adapter, and the model's adapter keeps its own weights.
    report = load_pretrained(model, [str(folder / "blip2_pretrained.pth")])
    assert sorted(k for k in report.missing if not k.startswith("encoders.")) == ["adapters.image.bias",
                                                                                 "adapters.image.weight"]


def test_hf_folder_builds_the_same_model(micro_zoo, llm_width: int, tmp_path: Path) -> None:
    torch.manual_seed(2)
    opt = OPTConfig(vocab_size=50, hidden_size=llm_width, word_embed_proj_dim=llm_width, num_hidden_layers=1,
                    ffn_dim=32, num_attention_heads=2, max_position_embeddings=32)
    config = Blip2Config(vision_config=vision_config().to_dict(), qformer_config=qformer_config(False).to_dict(),
                         text_config=opt.to_dict(), num_query_tokens=QUERIES)
    config.vision_config.layer_norm_eps = 1e-5
    hf = Blip2ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    model = build_model(resolve_model(model_cfg(micro_zoo, QFORMER, [tmp_path])))
    assert model.encoders["image"].model.post_layernorm.eps == 1e-5  # from the folder's config.json
    pixels = images()
    with torch.no_grad():
        features = hf.vision_model(pixels).last_hidden_state
        queries = hf.qformer(hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=features).last_hidden_state
        assert_close(model.encoders["image"](pixels)[0], features)
        assert_close(torch.stack(model.modality("image")(pixels)), hf.language_projection(queries))


def test_keys_without_a_place_stop_the_build(micro_zoo, lavis, tmp_path: Path) -> None:
    ref, _ = lavis
    path = tmp_path / "xllm_video.pth"
    torch.save({"model": stage2_dict(ref) | {"video_query_tokens": torch.zeros(1, QUERIES, QF_WIDTH)}}, path)
    with pytest.raises(ValueError, match=r"interfaces\.video\.query_tokens"):
        build_model(resolve_model(model_cfg(micro_zoo, QFORMER, [path])))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model(resolve_model(model_cfg(micro_zoo, QFORMER, [tmp_path / "nowhere.pth"])))


def test_config_ln_vision_eps_wins(micro_zoo, lavis) -> None:
    _, folder = lavis
    cfg = model_cfg(micro_zoo, QFORMER, [folder / "eva_vit_g.pth", folder / "blip2_pretrained_opt.pth"])
    cfg["modalities"]["image"]["encoder"] = {**ENCODER, "ln_vision_eps": 1e-6}
    assert build_model(resolve_model(cfg)).encoders["image"].model.post_layernorm.eps == 1e-6
    with pytest.raises(ConfigError, match="model.pretrained"):
        resolve_model({**cfg, "pretrained": "not-a-list"})
