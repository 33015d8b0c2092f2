"""BLIP-2 conversion: tiny random checkpoints in the LAVIS, Hugging Face and X-LLM layouts give the same outputs."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    BertConfig,
    BertModel,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    OPTConfig,
)

from xllm.models.converters.blip2 import (
    IMAGE_ENCODER,
    IMAGE_INTERFACE,
    QFORMER,
    interpolate_pos_embed,
    load_hf_blip2,
    load_into,
    load_lavis_checkpoint,
    load_xllm_checkpoint,
    merge_loaded,
)

VIT_WIDTH, VIT_HEADS, VIT_MLP, VIT_DEPTH, PATCH, IMAGE = 48, 4, 96, 2, 14, 42
QF_WIDTH, QF_HEADS, QF_FFN, QF_LAYERS, QUERIES, VOCAB, MAX_POS = 32, 4, 64, 3, 4, 40, 16
LLM_WIDTH = 24
TOL = 1e-4


# ---- reference modules with LAVIS's key names and math ------------------------------------------------------------

class EvaAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = VIT_HEADS
        self.scale = (VIT_WIDTH // VIT_HEADS) ** -0.5
        self.qkv = nn.Linear(VIT_WIDTH, 3 * VIT_WIDTH, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(VIT_WIDTH))
        self.v_bias = nn.Parameter(torch.zeros(VIT_WIDTH))
        self.proj = nn.Linear(VIT_WIDTH, VIT_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # LAVIS scales q before the matmul
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class EvaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(VIT_WIDTH, eps=1e-6)
        self.attn = EvaAttention()
        self.norm2 = nn.LayerNorm(VIT_WIDTH, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(VIT_WIDTH, VIT_MLP)
        self.mlp.fc2 = nn.Linear(VIT_MLP, VIT_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class EvaViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, VIT_WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2 + 1, VIT_WIDTH))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, VIT_WIDTH, PATCH, stride=PATCH)
        self.blocks = nn.ModuleList(EvaBlock() for _ in range(VIT_DEPTH))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x  # no final norm: ln_vision follows outside the ViT


class BertSelfAttention(nn.Module):
    def __init__(self, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(QF_WIDTH, QF_WIDTH)
        self.key = nn.Linear(kv_width, QF_WIDTH)
        self.value = nn.Linear(kv_width, QF_WIDTH)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], QF_HEADS, -1).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(kv)), heads(self.value(kv))
        attn = (q @ k.transpose(-2, -1) / (QF_WIDTH // QF_HEADS) ** 0.5).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(x.shape)


class DenseNorm(nn.Module):
    def __init__(self, width_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, QF_WIDTH)
        self.LayerNorm = nn.LayerNorm(QF_WIDTH, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # post-norm, BERT style


class BertAttention(nn.Module):
    def __init__(self, kv_width: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(kv_width)
        self.output = DenseNorm(QF_WIDTH)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, kv), x)


def dense(width_in: int, width_out: int) -> nn.Module:
    module = nn.Module()
    module.dense = nn.Linear(width_in, width_out)
    return module


class QformerLayer(nn.Module):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.attention = BertAttention(QF_WIDTH)
        if index % 2 == 0:
            self.crossattention = BertAttention(VIT_WIDTH)
        self.intermediate_query, self.output_query = dense(QF_WIDTH, QF_FFN), DenseNorm(QF_FFN)
        self.intermediate, self.output = dense(QF_WIDTH, QF_FFN), DenseNorm(QF_FFN)

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.attention(h, h)
        queries, text = h[:, :QUERIES], h[:, QUERIES:]
        if hasattr(self, "crossattention"):
            queries = self.crossattention(queries, image)
        queries = self.output_query(F.gelu(self.intermediate_query.dense(queries)), queries)
        text = self.output(F.gelu(self.intermediate.dense(text)), text)
        return torch.cat([queries, text], dim=1)


class LavisQformer(nn.Module):
    """``Qformer`` of LAVIS's Blip2Qformer: ``bert.*`` plus the tied ``cls.predictions`` head."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.Module()
        self.bert.embeddings.word_embeddings = nn.Embedding(VOCAB, QF_WIDTH)
        self.bert.embeddings.position_embeddings = nn.Embedding(MAX_POS, QF_WIDTH)
        self.bert.embeddings.LayerNorm = nn.LayerNorm(QF_WIDTH, eps=1e-12)
        self.bert.embeddings.register_buffer("position_ids", torch.arange(MAX_POS).expand(1, -1))
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(QformerLayer(i) for i in range(QF_LAYERS))
        self.cls = nn.Module()
        self.cls.predictions = nn.Module()
        self.cls.predictions.transform = DenseNorm(QF_WIDTH)
        self.cls.predictions.decoder = nn.Linear(QF_WIDTH, VOCAB)
        self.cls.predictions.bias = nn.Parameter(torch.zeros(VOCAB))

    def tie(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias


class LavisBlip2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual_encoder = EvaViT()
        self.ln_vision = nn.LayerNorm(VIT_WIDTH)  # eps 1e-5, as in LAVIS
        self.query_tokens = nn.Parameter(torch.zeros(1, QUERIES, QF_WIDTH))
        self.Qformer = LavisQformer()
        self.vision_proj, self.text_proj = nn.Linear(QF_WIDTH, 8), nn.Linear(QF_WIDTH, 8)
        self.itm_head = nn.Linear(QF_WIDTH, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.opt_proj = nn.Linear(QF_WIDTH, LLM_WIDTH)
        with torch.no_grad():
            for name, p in self.named_parameters():
                centre = 1.0 if p.dim() == 1 and "norm" in name.lower() and name.endswith("weight") else 0.0
                p.copy_(centre + 0.2 * torch.randn_like(p))
        self.Qformer.tie()

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.ln_vision(self.visual_encoder(image))

    def qformer(self, image: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.Qformer.bert.embeddings
        h = self.query_tokens.expand(len(image), -1, -1)
        if text_ids is not None:
            text = emb.word_embeddings(text_ids) + emb.position_embeddings(emb.position_ids[:, : text_ids.shape[1]])
            h = torch.cat([h, text], dim=1)
        h = emb.LayerNorm(h)
        features = self.image_features(image)
        for layer in self.Qformer.bert.encoder.layer:
            h = layer(h, features)
        return h


STAGE1_ONLY = ("visual_encoder.", "opt_proj.")
TEXT_BRANCH = ("Qformer.cls.", "Qformer.bert.embeddings.word_", "Qformer.bert.embeddings.position_embeddings",
               "vision_proj.", "text_proj.", "itm_head.", "temp")


def is_text_ffn(key: str) -> bool:
    return ".intermediate." in key or (".output." in key and "attention" not in key)


def stage2_dict(ref: LavisBlip2) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ref.state_dict().items()
            if not k.startswith(("visual_encoder.",) + TEXT_BRANCH) and not is_text_ffn(k)}


@pytest.fixture(scope="module")
def lavis(tmp_path_factory: pytest.TempPathFactory) -> tuple[LavisBlip2, Path]:
    torch.manual_seed(0)
    ref = LavisBlip2().eval()
    folder = tmp_path_factory.mktemp("lavis")
    torch.save(ref.visual_encoder.state_dict(), folder / "eva_vit_g.pth")
    stage1 = {k: v for k, v in ref.state_dict().items() if not k.startswith(STAGE1_ONLY)}
    torch.save({"model": stage1, "epoch": 9, "config": {"arch": "blip2"}}, folder / "blip2_pretrained.pth")
    torch.save({"model": stage2_dict(ref)}, folder / "blip2_pretrained_opt.pth")
    return ref, folder


def vision_config(**overrides: object) -> Blip2VisionConfig:
    values = dict(hidden_size=VIT_WIDTH, intermediate_size=VIT_MLP, num_hidden_layers=VIT_DEPTH,
                  num_attention_heads=VIT_HEADS, image_size=IMAGE, patch_size=PATCH, qkv_bias=True)
    return Blip2VisionConfig(**{**values, **overrides})


def qformer_config(text: bool) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(hidden_size=QF_WIDTH, num_hidden_layers=QF_LAYERS, num_attention_heads=QF_HEADS,
                              intermediate_size=QF_FFN, encoder_hidden_size=VIT_WIDTH, vocab_size=VOCAB,
                              max_position_embeddings=MAX_POS, use_qformer_text_input=text)


def hf_vision(sd: dict[str, torch.Tensor], eps: float, image_size: int = IMAGE) -> Blip2VisionModel:
    model = Blip2VisionModel(vision_config(image_size=image_size)).eval()
    model.post_layernorm.eps = eps
    load_into(model, sd, prefix=IMAGE_ENCODER)
    return model


def hf_qformer(sd: dict[str, torch.Tensor], text: bool) -> Blip2QFormerModel:
    model = Blip2QFormerModel(qformer_config(text)).eval()
    load_into(model, sd, prefix=QFORMER)
    return model


def target_keys(text: bool, adapter: bool) -> list[str]:
    keys = [IMAGE_ENCODER + k for k in Blip2VisionModel(vision_config()).state_dict()]
    keys += [QFORMER + k for k in Blip2QFormerModel(qformer_config(text)).state_dict()]
    keys += [IMAGE_INTERFACE + "query_tokens", "llm.transformer.word_embeddings.weight"]
    if adapter:
        keys += ["adapters.image.weight", "adapters.image.bias"]
    if text:
        keys += [IMAGE_INTERFACE + k for k in (
            "text.word_embeddings.weight", "text.position_embeddings.weight", "vision_proj.weight", "vision_proj.bias",
            "text_proj.weight", "text_proj.bias", "itm_head.weight", "itm_head.bias", "temp",
            "lm_head.transform.dense.weight", "lm_head.transform.dense.bias", "lm_head.transform.LayerNorm.weight",
            "lm_head.transform.LayerNorm.bias", "lm_head.decoder.weight", "lm_head.decoder.bias")]
    return keys


def images(size: int = IMAGE) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL


# ---- LAVIS ---------------------------------------------------------------------------------------------------------

def test_lavis_stage1_same_outputs(lavis: tuple[LavisBlip2, Path]) -> None:
    ref, folder = lavis
    keys = target_keys(text=True, adapter=False)
    sd, report = merge_loaded(load_lavis_checkpoint(folder / "eva_vit_g.pth"),
                              load_lavis_checkpoint(folder / "blip2_pretrained.pth"), target_keys=keys)
    assert report.ok, str(report)
    assert report.ln_vision_eps == 1e-5
    assert "position_ids" in report.dropped["Qformer.bert.embeddings.position_ids"]
    assert "tied" in report.dropped["Qformer.cls.predictions.bias"]
    assert "visual_encoder.blocks.0.attn.q_bias" in report.consumed

    vision, qformer = hf_vision(sd, report.ln_vision_eps), hf_qformer(sd, text=True)
    pixels, text_ids = images(), torch.tensor([[3, 7, 1], [5, 2, 9]])
    text = (sd[IMAGE_INTERFACE + "text.word_embeddings.weight"][text_ids]
            + sd[IMAGE_INTERFACE + "text.position_embeddings.weight"][:3])
    queries = sd[IMAGE_INTERFACE + "query_tokens"].expand(2, -1, -1)
    with torch.no_grad():
        features = vision(pixels).last_hidden_state
        out = qformer(torch.cat([queries, text], 1), query_length=QUERIES, encoder_hidden_states=features)
        assert close(features, ref.image_features(pixels))
        assert close(out.last_hidden_state, ref.qformer(pixels, text_ids))

    decoder, words = sd[IMAGE_INTERFACE + "lm_head.decoder.weight"], sd[IMAGE_INTERFACE + "text.word_embeddings.weight"]
    assert decoder.data_ptr() == words.data_ptr()  # one tensor under two names, as in the file
    assert torch.equal(sd[IMAGE_INTERFACE + "lm_head.decoder.bias"], ref.Qformer.cls.predictions.bias)
    assert torch.equal(sd[IMAGE_INTERFACE + "itm_head.weight"], ref.itm_head.weight)
    assert torch.equal(sd[IMAGE_INTERFACE + "temp"], ref.temp)


def test_lavis_stage2_same_outputs(lavis: tuple[LavisBlip2, Path]) -> None:
    ref, folder = lavis
    keys = target_keys(text=False, adapter=True)
    sd, report = merge_loaded(load_lavis_checkpoint(folder / "eva_vit_g.pth"),
                              load_lavis_checkpoint(folder / "blip2_pretrained_opt.pth"), target_keys=keys)
    assert report.ok, str(report)
    vision, qformer = hf_vision(sd, report.ln_vision_eps), hf_qformer(sd, text=False)
    adapter = nn.Linear(QF_WIDTH, LLM_WIDTH)
    load_into(adapter, sd, prefix="adapters.image.")
    pixels = images()
    with torch.no_grad():
        features = vision(pixels).last_hidden_state
        out = qformer(sd[IMAGE_INTERFACE + "query_tokens"].expand(2, -1, -1), encoder_hidden_states=features)
        expected = ref.qformer(pixels)
        assert close(out.last_hidden_state, expected)
        assert close(adapter(out.last_hidden_state), ref.opt_proj(expected))


def test_stage1_file_into_stage2_target_drops_text_branch(lavis: tuple[LavisBlip2, Path]) -> None:
    _, folder = lavis
    keys = [k for k in target_keys(text=False, adapter=False) if not k.startswith(IMAGE_ENCODER + "e")]
    sd, report = load_lavis_checkpoint(folder / "blip2_pretrained.pth", target_keys=keys)
    assert report.ok, str(report)
    for key in ("Qformer.cls.predictions.decoder.weight", "Qformer.cls.predictions.bias", "itm_head.weight", "temp",
                "Qformer.bert.encoder.layer.0.intermediate.dense.weight",
                "Qformer.bert.embeddings.word_embeddings.weight"):
        assert "text branch" in report.dropped[key]
    assert not any(k.startswith((IMAGE_INTERFACE + "lm_head", IMAGE_INTERFACE + "text.")) for k in sd)


def test_pos_embed_interpolation_matches_bicubic_resize(lavis: tuple[LavisBlip2, Path]) -> None:
    ref, folder = lavis
    big = IMAGE + PATCH  # a 4 x 4 patch grid instead of 3 x 3
    stage2 = load_lavis_checkpoint(folder / "blip2_pretrained_opt.pth")  # for ln_vision
    sd, report = merge_loaded(load_lavis_checkpoint(folder / "eva_vit_g.pth", image_size=big), stage2)
    assert sd[IMAGE_ENCODER + "embeddings.position_embedding"].shape == (1, 17, VIT_WIDTH)
    assert any("interpolated" in n for n in report.notes)
    small_sd, _ = merge_loaded(load_lavis_checkpoint(folder / "eva_vit_g.pth"), stage2)
    resized, original = hf_vision(sd, 1e-5, image_size=big), hf_vision(small_sd, 1e-5)
    pixels = images(big)
    with torch.no_grad():  # transformers resizes on the fly with the same bicubic rule
        assert close(resized(pixels).last_hidden_state,
                     original(pixels, interpolate_pos_encoding=True).last_hidden_state)
    pos = ref.visual_encoder.pos_embed.detach()
    assert torch.equal(interpolate_pos_embed(pos, 3), pos)
    assert torch.equal(interpolate_pos_embed(pos, 4)[:, 0], pos[:, 0])


# ---- Hugging Face --------------------------------------------------------------------------------------------------

def tiny_hf_config(text: bool = False) -> Blip2Config:
    opt = OPTConfig(vocab_size=50, hidden_size=LLM_WIDTH, word_embed_proj_dim=LLM_WIDTH, num_hidden_layers=1,
                    ffn_dim=32, num_attention_heads=2, max_position_embeddings=32)
    return Blip2Config(vision_config=vision_config().to_dict(), qformer_config=qformer_config(text).to_dict(),
                       text_config=opt.to_dict(), num_query_tokens=QUERIES)


@pytest.mark.parametrize(("model_class", "layout"), [(Blip2ForConditionalGeneration, "safetensors"),
                                                     (Blip2ForConditionalGeneration, "sharded"),
                                                     (Blip2ForConditionalGeneration, "bin"),
                                                     (Blip2Model, "safetensors")])
def test_hf_checkpoint_same_outputs(tmp_path: Path, model_class: type, layout: str) -> None:
    torch.manual_seed(2)
    model = model_class(tiny_hf_config()).eval()
    if layout == "bin":  # the pre-safetensors layout, which save_pretrained no longer writes
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        model.save_pretrained(tmp_path, max_shard_size="40KB" if layout == "sharded" else "50GB")
    sd, report = load_hf_blip2(tmp_path, target_keys=target_keys(text=False, adapter=True))
    assert report.ok, str(report)
    assert report.ln_vision_eps == model.config.vision_config.layer_norm_eps
    assert any(k.startswith("language_model.") for k in report.dropped)
    vision, qformer = hf_vision(sd, report.ln_vision_eps), hf_qformer(sd, text=False)
    pixels = images()
    with torch.no_grad():
        features = vision(pixels).last_hidden_state
        expected_features = model.vision_model(pixels).last_hidden_state
        queries = model.query_tokens.expand(2, -1, -1)
        assert close(features, expected_features)
        assert close(qformer(queries, encoder_hidden_states=features).last_hidden_state,
                     model.qformer(queries, encoder_hidden_states=expected_features).last_hidden_state)
    assert torch.equal(sd["adapters.image.weight"], model.language_projection.weight)


def test_hf_retrieval_checkpoint_maps_text_branch(tmp_path: Path) -> None:
    model = Blip2ForImageTextRetrieval(tiny_hf_config(text=True))
    model.save_pretrained(tmp_path)
    sd, report = load_hf_blip2(tmp_path)
    assert not report.unexpected, str(report)
    assert torch.equal(sd[IMAGE_INTERFACE + "text.word_embeddings.weight"], model.embeddings.word_embeddings.weight)
    assert torch.equal(sd[IMAGE_INTERFACE + "vision_proj.weight"], model.vision_projection.weight)
    assert torch.equal(sd[IMAGE_INTERFACE + "text_proj.bias"], model.text_projection.bias)
    assert QFORMER + "encoder.layer.0.intermediate.dense.weight" in sd


# ---- X-LLM ---------------------------------------------------------------------------------------------------------

def tiny_bert() -> BertModel:
    return BertModel(BertConfig(vocab_size=30, hidden_size=QF_WIDTH, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=QF_FFN, max_position_embeddings=MAX_POS))


def test_xllm_keys_map(lavis: tuple[LavisBlip2, Path], tmp_path: Path) -> None:
    ref, _ = lavis
    bert = tiny_bert()
    sd = stage2_dict(ref)
    sd |= {"video_query_tokens": torch.randn(1, QUERIES, QF_WIDTH),
           "video_proj.weight": torch.randn(LLM_WIDTH, QF_WIDTH), "video_proj.bias": torch.randn(LLM_WIDTH),
           "pre_bert_proj.weight": torch.randn(QF_WIDTH, 12),
           "pre_bert_proj.bias": torch.randn(QF_WIDTH), "post_bert_proj.weight": torch.randn(LLM_WIDTH, QF_WIDTH),
           "post_bert_proj.bias": torch.randn(LLM_WIDTH),
           "opt_model.transformer.layers.0.attention.rotary_emb.inv_freq": torch.randn(4).half(),
           "speech_bert_adaptor.embeddings.position_ids": torch.arange(MAX_POS)[None]}
    sd |= {"speech_bert_adaptor." + k: v for k, v in bert.state_dict().items()}
    torch.save({"model": sd, "optimizer": {}, "epoch": 1}, tmp_path / "xllm.pth")

    out, report = load_xllm_checkpoint(tmp_path / "xllm.pth")
    assert not report.unexpected, str(report)
    assert torch.equal(out["interfaces.video.query_tokens"], sd["video_query_tokens"])
    assert torch.equal(out["adapters.video.weight"], sd["video_proj.weight"])
    assert torch.equal(out["interfaces.speech.input_proj.bias"], sd["pre_bert_proj.bias"])
    assert torch.equal(out["adapters.speech.weight"], sd["post_bert_proj.weight"])
    assert torch.equal(out["adapters.image.weight"], sd["opt_proj.weight"])
    assert "rotary" in report.dropped["opt_model.transformer.layers.0.attention.rotary_emb.inv_freq"]
    assert "buffer" in report.dropped["speech_bert_adaptor.embeddings.position_ids"]
    load_into(tiny_bert(), out, prefix="interfaces.speech.bert.")

    _, lavis_report = load_lavis_checkpoint(tmp_path / "xllm.pth")
    assert "video_query_tokens" in lavis_report.unexpected and "post_bert_proj.weight" in lavis_report.unexpected


def test_xllm_fc_speech_adaptor(tmp_path: Path) -> None:
    weight, bias = torch.randn(LLM_WIDTH, 12), torch.randn(LLM_WIDTH)
    torch.save({"speech_feat_proj.weight": weight, "speech_feat_proj.bias": bias}, tmp_path / "fc.pth")
    out, report = load_xllm_checkpoint(tmp_path / "fc.pth")
    assert report.ok, str(report)
    assert torch.equal(out["adapters.speech.weight"], weight) and torch.equal(out["adapters.speech.bias"], bias)


# ---- errors --------------------------------------------------------------------------------------------------------

def test_corrupted_file_lists_bad_keys(lavis: tuple[LavisBlip2, Path], tmp_path: Path) -> None:
    ref, _ = lavis
    sd = stage2_dict(ref)
    sd["Qformer.bert.encoder.layer.0.attention.slf.query.weight"] = sd.pop(
        "Qformer.bert.encoder.layer.0.attention.self.query.weight")
    del sd["opt_proj.bias"]
    path = tmp_path / "corrupt.pth"
    torch.save({"model": sd}, path)
    keys = [k for k in target_keys(text=False, adapter=True) if not k.startswith(IMAGE_ENCODER + "e")]
    out, report = load_lavis_checkpoint(path, target_keys=keys)
    assert report.unexpected == ["Qformer.bert.encoder.layer.0.attention.slf.query.weight"]
    assert report.missing == ["adapters.image.bias", QFORMER + "encoder.layer.0.attention.attention.query.weight"]
    with pytest.raises(ValueError, match="corrupt.pth.*slf.query.weight.*adapters.image.bias"):
        report.check()
    with pytest.raises(ValueError, match=r"\(1 problem\):\n  - missing key encoder.layer.0.attention.attention.query.weight$"):
        load_into(Blip2QFormerModel(qformer_config(False)), out, prefix=QFORMER)
    with pytest.raises(ValueError, match="missing key bias"):
        load_into(nn.Linear(QF_WIDTH, LLM_WIDTH), out, prefix="adapters.image.")


def test_unpaired_q_bias_names_file_and_key(lavis: tuple[LavisBlip2, Path], tmp_path: Path) -> None:
    ref, _ = lavis
    sd = ref.visual_encoder.state_dict()
    del sd["blocks.1.attn.v_bias"]
    torch.save(sd, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"vit.pth: visual_encoder.blocks.1.attn.q_bias has no partner"):
        load_lavis_checkpoint(tmp_path / "vit.pth")


def test_load_into_rejects_wrong_shapes() -> None:
    sd = {"x.weight": torch.zeros(3, 2), "x.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"weight has shape \[3, 2\], the model needs \[2, 2\]"):
        load_into(nn.Linear(2, 2), sd, prefix="x.")
    missing, unexpected = load_into(nn.Linear(2, 3), {"x.weight": torch.ones(3, 2), "x.extra": torch.ones(1)},
                                    prefix="x.", strict=False)
    assert (missing, unexpected) == (["bias"], ["extra"])
