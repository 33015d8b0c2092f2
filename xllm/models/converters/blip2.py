"""Convert BLIP-2 weights (LAVIS ``.pth``, Hugging Face ``Blip2*`` folders, X-LLM runner checkpoints) to xllm names.

Every loader returns ``(state_dict, LoadReport)``. The state dict uses the names of the composite ``XLLM`` module,
which the rule tables below list: a ``transformers.Blip2VisionModel`` under ``encoders.image.model`` (its
``post_layernorm`` is LAVIS's ``ln_vision``), a ``Blip2QFormerModel`` under ``interfaces.image.qformer``.

Nothing is loaded with ``strict=False``: the report names every consumed, dropped (with the reason), unexpected and
missing key, and :func:`load_into` raises on any mismatch.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from xllm.common.checkpoint import CheckpointError, load_state, read_pickled_tensors, read_weights

IMAGE_ENCODER = "encoders.image.model."
IMAGE_INTERFACE = "interfaces.image."
QFORMER = IMAGE_INTERFACE + "qformer."
LLM_PREFIX = "llm."

LAVIS_LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is a plain nn.LayerNorm with the default eps
HF_LAYER_NORM_EPS = 1e-6  # Blip2VisionConfig default; HF shares it between the block norms and post_layernorm

# Stage-1 only parts of the Q-Former (text embeddings, text FFN, LM head, ITC/ITM heads).
_TEXT_KEY_MARKERS = (IMAGE_INTERFACE + "text.", IMAGE_INTERFACE + "lm_head.", IMAGE_INTERFACE + "vision_proj.",
                     IMAGE_INTERFACE + "text_proj.", IMAGE_INTERFACE + "itm_head.", IMAGE_INTERFACE + "temp")
_TEXT_FFN = re.compile(re.escape(QFORMER) + r"encoder\.layer\.\d+\.(intermediate|output)\.")

_WB = r"(weight|bias)"

# (pattern over the whole source key, xllm key template, kind); kind "text" = stage-1 text branch, "xllm" = X-LLM only.
_LAVIS_RULES: list[tuple[str, str, str]] = [
    (r"visual_encoder\.cls_token", IMAGE_ENCODER + "embeddings.class_embedding", "core"),
    (r"visual_encoder\.pos_embed", IMAGE_ENCODER + "embeddings.position_embedding", "core"),
    (rf"visual_encoder\.patch_embed\.proj\.{_WB}", IMAGE_ENCODER + r"embeddings.patch_embedding.\1", "core"),
    (rf"visual_encoder\.blocks\.(\d+)\.norm([12])\.{_WB}", IMAGE_ENCODER + r"encoder.layers.\1.layer_norm\2.\3",
     "core"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", IMAGE_ENCODER + r"encoder.layers.\1.self_attn.qkv.weight",
     "core"),
    (rf"visual_encoder\.blocks\.(\d+)\.attn\.proj\.{_WB}", IMAGE_ENCODER + r"encoder.layers.\1.self_attn.projection.\2",
     "core"),
    (rf"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.{_WB}", IMAGE_ENCODER + r"encoder.layers.\1.mlp.\2.\3", "core"),
    (rf"ln_vision\.{_WB}", IMAGE_ENCODER + r"post_layernorm.\1", "core"),
    (r"query_tokens", IMAGE_INTERFACE + "query_tokens", "core"),
    (rf"Qformer\.bert\.embeddings\.LayerNorm\.{_WB}", QFORMER + r"layernorm.\1", "core"),
    (rf"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.{_WB}",
     QFORMER + r"encoder.layer.\1.\2.attention.\3.\4", "core"),
    ((rf"Qformer\.bert\.(encoder\.layer\.\d+\.((attention|crossattention)\.output\.(dense|LayerNorm)"
      rf"|intermediate_query\.dense|output_query\.(dense|LayerNorm))\.{_WB})"), QFORMER + r"\1", "core"),
    (rf"(opt_proj|t5_proj)\.{_WB}", r"adapters.image.\2", "core"),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight",
     IMAGE_INTERFACE + r"text.\1_embeddings.weight", "text"),
    (rf"Qformer\.bert\.(encoder\.layer\.\d+\.(intermediate\.dense|output\.(dense|LayerNorm))\.{_WB})", QFORMER + r"\1",
     "text"),
    (rf"Qformer\.cls\.predictions\.transform\.(dense|LayerNorm)\.{_WB}",
     IMAGE_INTERFACE + r"lm_head.transform.\1.\2", "text"),
    (rf"Qformer\.cls\.predictions\.decoder\.{_WB}", IMAGE_INTERFACE + r"lm_head.decoder.\1", "text"),
    (rf"(vision_proj|text_proj|itm_head)\.{_WB}", IMAGE_INTERFACE + r"\1.\2", "text"),
    (r"temp", IMAGE_INTERFACE + "temp", "text"),
    (r"video_query_tokens", "interfaces.video.query_tokens", "xllm"),
    (rf"video_proj\.{_WB}", r"adapters.video.\1", "xllm"),
    (rf"pre_bert_proj\.{_WB}", r"interfaces.speech.input_proj.\1", "xllm"),
    (r"speech_bert_adaptor\.(.+)", r"interfaces.speech.bert.\1", "xllm"),
    (rf"(post_bert_proj|speech_feat_proj)\.{_WB}", r"adapters.speech.\2", "xllm"),
]

_LLM_DROP_REASON = "LLM weights: the LLM is loaded separately"
_NOT_IN_TARGET = " (converted; no such key in the target)"

_LAVIS_DROPS: list[tuple[str, str]] = [
    (r"Qformer\.bert\.embeddings\.position_ids", "position_ids buffer: not persistent in transformers"),
]

_XLLM_DROPS: list[tuple[str, str]] = [
    (r"speech_bert_adaptor\.embeddings\.(position_ids|token_type_ids)",
     "BertModel buffer: not persistent in transformers"),
    (r"opt_model\..*rotary_emb\.inv_freq", "ChatGLM rotary buffer saved by the runner; recomputed by the LLM"),
    (r"opt_model\..+", _LLM_DROP_REASON),
]
_TEXT_DROP_REASON = "stage-1 text branch (text embeddings, text FFN, LM/ITC/ITM heads): the target has none"

_HF_RULES: list[tuple[str, str, str]] = [
    (rf"vision_model\.(embeddings\.(class_embedding|position_embedding|patch_embedding\.{_WB})"
     rf"|encoder\.layers\.\d+\.(layer_norm[12]|self_attn\.(qkv|projection)|mlp\.fc[12])\.{_WB}|post_layernorm\.{_WB})",
     IMAGE_ENCODER + r"\1", "core"),
    (r"query_tokens", IMAGE_INTERFACE + "query_tokens", "core"),
    (rf"qformer\.(layernorm\.{_WB}|encoder\.layer\.\d+\.((attention|crossattention)\.(attention\.(query|key|value)"
     rf"|output\.(dense|LayerNorm))|intermediate_query\.dense|output_query\.(dense|LayerNorm))\.{_WB})",
     QFORMER + r"\1", "core"),
    (rf"language_projection\.{_WB}", r"adapters.image.\1", "core"),
    (rf"qformer\.(encoder\.layer\.\d+\.(intermediate\.dense|output\.(dense|LayerNorm))\.{_WB})", QFORMER + r"\1",
     "text"),
    (r"embeddings\.(word|position)_embeddings\.weight", IMAGE_INTERFACE + r"text.\1_embeddings.weight", "text"),
    (rf"(vision|text)_projection\.{_WB}", IMAGE_INTERFACE + r"\1_proj.\2", "text"),
    (rf"itm_head\.{_WB}", IMAGE_INTERFACE + r"itm_head.\1", "text"),
]

_HF_DROPS: list[tuple[str, str]] = [
    (r"(qformer\.)?embeddings\.position_ids", "position_ids buffer: not persistent in transformers"),
    (r"language_model\..+", _LLM_DROP_REASON),
]


@dataclass
class LoadReport:
    """What a conversion did with every key of its source.

    ``missing`` is ``None`` when no target keys were given; keys under ``llm.`` are never counted as missing because
    the LLM is loaded separately. ``ln_vision_eps`` is the eps the source implies for ``post_layernorm``.
    """

    source: str
    consumed: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] | None = None
    ln_vision_eps: float | None = None
    notes: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)  # the target keys given a value (merged reports only)

    @property
    def ok(self) -> bool:
        return not self.unexpected and not self.missing

    def check(self) -> None:
        """Raise ``ValueError`` naming the source and the bad keys if anything is unexpected or missing."""
        if not self.ok:
            raise ValueError(f"{self.source}: unexpected keys {self.unexpected}; missing keys {self.missing or []}")

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.consumed)} consumed, {len(self.dropped)} dropped, "
                 f"{len(self.unexpected)} unexpected, "
                 f"{'no target given' if self.missing is None else f'{len(self.missing)} missing'}"]
        lines += [f"  dropped {n}: {reason}" for reason, n in Counter(self.dropped.values()).items()]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  missing: {k}" for k in self.missing or []]
        if self.ln_vision_eps is not None:
            lines.append(f"  ln_vision_eps (post_layernorm.eps) implied by the source: {self.ln_vision_eps:g}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Conversion:
    """Collects converted tensors for one source and keeps the report in step with them."""

    def __init__(self, source: str, sd: Mapping[str, torch.Tensor]):
        self.source, self.sd, self.report = source, sd, LoadReport(source)
        self.out: dict[str, torch.Tensor] = {}
        self.handled: set[str] = set()

    def put(self, dst: str, tensor: torch.Tensor, *src: str) -> None:
        if dst in self.out:
            raise ValueError(f"{self.source}: keys {sorted(src)} and an earlier key both map to {dst}")
        self.out[dst] = tensor
        self.report.consumed.extend(src)
        self.handled.update(src)

    def drop(self, src: str, reason: str) -> None:
        self.report.dropped[src] = reason
        self.handled.add(src)

    def apply_rules(self, rules: list[tuple[str, str, str]], drops: list[tuple[str, str]], *, text_branch: bool,
                    allow_xllm: bool) -> None:
        for key in sorted(self.sd):
            if key in self.handled:
                continue
            reason = next((r for pattern, r in drops if re.fullmatch(pattern, key)), None)
            if reason is not None:
                self.drop(key, reason)
                continue
            for pattern, template, kind in rules:
                match = re.fullmatch(pattern, key)
                if match is None or (kind == "xllm" and not allow_xllm):
                    continue
                if kind == "text" and not text_branch:
                    self.drop(key, _TEXT_DROP_REASON)
                else:
                    self.put(match.expand(template), self.sd[key], key)
                break
            else:
                self.report.unexpected.append(key)


def _wants_text_branch(target_keys: list[str] | None) -> bool:
    """The stage-1 text branch is kept unless the target keys hold none of it."""
    return target_keys is None or any(k.startswith(_TEXT_KEY_MARKERS) or _TEXT_FFN.match(k) for k in target_keys)


def _merge_qkv_bias(conv: _Conversion, q_pattern: str, dst: str) -> None:
    """Build ``qkv.bias`` = [q_bias, zeros, v_bias]: EVA has no k bias (softmax cancels one anyway)."""
    for key in sorted(conv.sd):
        match = re.fullmatch(q_pattern, key)
        if match is None:
            continue
        partner = key.removesuffix("q_bias") + "v_bias"
        if partner not in conv.sd:
            raise ValueError(f"{conv.source}: {key} has no partner {partner}")
        q_bias, v_bias = conv.sd[key], conv.sd[partner]
        conv.put(match.expand(dst), torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]), key, partner)
    orphans = [k for k in conv.sd if re.fullmatch(q_pattern.replace("q_bias", "v_bias"), k) and k not in conv.handled]
    if orphans:
        raise ValueError(f"{conv.source}: v_bias keys without q_bias: {orphans}")


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize absolute position embeddings [1, 1 + g*g, D] to a ``grid`` x ``grid`` patch grid.

    The cls token is kept; the patch part is resized bicubically (align_corners=False), as LAVIS does when
    the image size differs from the one the ViT was trained at. Computed in fp32, returned in the input dtype.
    """
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"position embedding with {patches.shape[1]} patch positions is not a square grid")
    if old == grid:
        return pos_embed
    dim = patches.shape[-1]
    patches = patches.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def _finish(conv: _Conversion, target_keys: Iterable[str] | None, image_size: int | None
            ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Interpolates the position embedding to ``image_size`` if given, then compares with the target keys."""
    key = IMAGE_ENCODER + "embeddings.position_embedding"
    patch_key = IMAGE_ENCODER + "embeddings.patch_embedding.weight"
    if image_size is not None and key in conv.out:
        if patch_key not in conv.out:
            raise ValueError(f"{conv.source}: cannot resize {key} without the patch size from {patch_key}")
        before = conv.out[key].shape[1]
        conv.out[key] = interpolate_pos_embed(conv.out[key], image_size // conv.out[patch_key].shape[-1])
        if conv.out[key].shape[1] != before:
            conv.report.notes.append(f"position embedding interpolated from {before} to {conv.out[key].shape[1]} "
                                     f"tokens for image size {image_size}")
    if target_keys is not None:
        _compare_with_target(conv.out, conv.report, target_keys)
    return conv.out, conv.report


def _compare_with_target(out: Mapping[str, torch.Tensor], report: LoadReport, target_keys: Iterable[str]) -> None:
    target = set(target_keys)
    report.missing = sorted(k for k in target - set(out) if not k.startswith(LLM_PREFIX))
    report.unexpected += sorted(k + _NOT_IN_TARGET for k in set(out) - target)


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    """A LAVIS runner file is ``{"model": sd, "optimizer": ..., ...}``; released files may also be the bare ``sd``."""
    obj = read_pickled_tensors(path)
    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad}")
    return sd


_BARE_VIT = re.compile(r"(cls_token|pos_embed|patch_embed\..+|blocks\..+)")


def _convert_lavis_file(path: str | Path, *, allow_xllm: bool, image_size: int | None,
                        target_keys: Iterable[str] | None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    path = Path(path)
    sd = _read_pth(path)
    # eva_vit_g.pth holds the bare VisionTransformer, i.e. the visual_encoder.* keys without their prefix.
    sd = {("visual_encoder." + k if _BARE_VIT.fullmatch(k) else k): v for k, v in sd.items()}
    target_keys = list(target_keys) if target_keys is not None else None
    keep_text = _wants_text_branch(target_keys)
    conv = _Conversion(str(path), sd)
    conv.report.ln_vision_eps = LAVIS_LN_VISION_EPS
    _merge_qkv_bias(conv, r"visual_encoder\.blocks\.(\d+)\.attn\.q_bias",
                    IMAGE_ENCODER + r"encoder.layers.\1.self_attn.qkv.bias")
    _tie_lm_head(conv, keep_text)
    adaptors = {k.split(".")[0] for k in sd if k.startswith(("post_bert_proj.", "speech_feat_proj."))}
    if len(adaptors) > 1:
        raise ValueError(f"{path}: both speech adaptors present ({sorted(adaptors)}); both map to adapters.speech")
    drops = _LAVIS_DROPS + (_XLLM_DROPS if allow_xllm else [])
    conv.apply_rules(_LAVIS_RULES, drops, text_branch=keep_text, allow_xllm=allow_xllm)
    if keep_text:
        _fill_tied_decoder(conv)
    return _finish(conv, target_keys, image_size)


def _tie_lm_head(conv: _Conversion, keep_text: bool) -> None:
    """``cls.predictions.bias`` and ``cls.predictions.decoder.bias`` are one tensor in LAVIS: keep it once."""
    bias, decoder_bias = "Qformer.cls.predictions.bias", "Qformer.cls.predictions.decoder.bias"
    if bias not in conv.sd:
        return
    if not keep_text:
        conv.drop(bias, _TEXT_DROP_REASON)
    elif decoder_bias not in conv.sd:
        conv.put(IMAGE_INTERFACE + "lm_head.decoder.bias", conv.sd[bias], bias)
    elif torch.equal(conv.sd[bias], conv.sd[decoder_bias]):
        conv.drop(bias, f"same tensor as {decoder_bias} (tied in LAVIS)")
    else:
        raise ValueError(f"{conv.source}: {bias} and {decoder_bias} should be one tied tensor but differ")


def _fill_tied_decoder(conv: _Conversion) -> None:
    """The LM-head decoder weight is the word-embedding table; give the target both names if the file had one."""
    words, decoder = IMAGE_INTERFACE + "text.word_embeddings.weight", IMAGE_INTERFACE + "lm_head.decoder.weight"
    has_head = any(k.startswith(IMAGE_INTERFACE + "lm_head.") for k in conv.out)
    if has_head and words in conv.out and decoder not in conv.out:
        conv.out[decoder] = conv.out[words]
        conv.report.notes.append(f"{decoder} filled from {words} (tied)")
    elif decoder in conv.out and words in conv.out and not torch.equal(conv.out[decoder], conv.out[words]):
        conv.report.notes.append(f"{decoder} differs from {words}: the file was not tied")


def load_lavis_checkpoint(path: str | Path, *, image_size: int | None = None, target_keys: Iterable[str] | None = None
                          ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Convert one LAVIS BLIP-2 ``.pth`` file (``_LAVIS_RULES`` maps every key): ``eva_vit_g.pth`` (the bare ViT;
    q_bias, zeros and v_bias become ``qkv.bias``), ``blip2_pretrained.pth`` (stage 1, text branch included; the LM
    head's decoder is tied to the word embeddings) or a stage-2 file (``opt_proj`` / ``t5_proj`` -> ``adapters.image``).

    ``image_size``: interpolate ``pos_embed`` to this image size. ``target_keys`` (e.g. ``model.state_dict().keys()``):
    fills ``report.missing`` and lists converted keys the target lacks as unexpected; the stage-1 text branch is kept
    unless they hold none of it. The source implies ``ln_vision_eps = 1e-5``.
    """
    return _convert_lavis_file(path, allow_xllm=False, image_size=image_size, target_keys=target_keys)


def load_xllm_checkpoint(path: str | Path, *, image_size: int | None = None, target_keys: Iterable[str] | None = None
                         ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Convert an X-LLM runner checkpoint (``{"model": sd}`` or flat), single-stage or merged: the LAVIS stage-2
    keys plus X-LLM's video, speech and adaptor keys (the "xllm" rules); ChatGLM's ``opt_model.*`` keys are dropped
    (the LLM is loaded separately). Options as in :func:`load_lavis_checkpoint`.
    """
    return _convert_lavis_file(path, allow_xllm=True, image_size=image_size, target_keys=target_keys)


def load_hf_blip2(path: str | Path, *, image_size: int | None = None, target_keys: Iterable[str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Convert a Hugging Face ``Blip2Model``, ``Blip2ForConditionalGeneration`` or ``Blip2ForImageTextRetrieval``
    (a ``save_pretrained`` folder or one weight file; ``_HF_RULES`` maps every key). ``language_model.*`` is not
    read (the LLM is loaded separately); pre-4.27 ``self_attn.q_bias``/``v_bias`` are merged into ``qkv.bias``;
    ``ln_vision_eps`` comes from ``config.json``. Options as in :func:`load_lavis_checkpoint`.
    """
    path = Path(path)
    weights = read_weights(path, skip=lambda key: key.startswith("language_model."))
    if weights.problems:
        raise CheckpointError(f"{path}: " + "; ".join(weights.problems))
    sd, llm_keys = weights.tensors, sorted(weights.skipped)
    target_keys = list(target_keys) if target_keys is not None else None
    conv = _Conversion(str(path), sd)
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if config.is_file():
        eps = json.loads(config.read_text()).get("vision_config", {}).get("layer_norm_eps", HF_LAYER_NORM_EPS)
    else:
        eps = HF_LAYER_NORM_EPS
        conv.report.notes.append(f"no config.json next to {path}: assuming the HF default eps {eps:g}")
    conv.report.ln_vision_eps = float(eps)
    for key in llm_keys:
        conv.drop(key, _LLM_DROP_REASON)
    if llm_keys:
        conv.report.notes.append(f"{len(llm_keys)} language_model.* tensors not read: the LLM is loaded separately")
    _merge_qkv_bias(conv, r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.q_bias",
                    IMAGE_ENCODER + r"encoder.layers.\1.self_attn.qkv.bias")
    conv.apply_rules(_HF_RULES, _HF_DROPS, text_branch=_wants_text_branch(target_keys), allow_xllm=False)
    return _finish(conv, target_keys, image_size)


def merge_loaded(*loaded: tuple[dict[str, torch.Tensor], LoadReport], target_keys: Iterable[str] | None = None
                 ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Merge conversions (e.g. ``eva_vit_g.pth`` + a stage-2 file); a later source wins, as in X-LLM's merge script."""
    merged: dict[str, torch.Tensor] = {}
    report = LoadReport(" + ".join(r.source for _, r in loaded))
    for sd, part in loaded:
        overridden = sorted(set(sd) & set(merged))
        if overridden:
            report.notes.append(f"{part.source} overrides {len(overridden)} keys: {overridden}")
        merged.update(sd)
        report.consumed += part.consumed
        report.dropped.update(part.dropped)
        report.unexpected += [k for k in part.unexpected if not k.endswith(_NOT_IN_TARGET)]
        report.notes += part.notes
        if part.ln_vision_eps is not None:
            if report.ln_vision_eps not in (None, part.ln_vision_eps):
                report.notes.append(f"sources disagree on ln_vision_eps; {part.source} implies {part.ln_vision_eps:g}")
            report.ln_vision_eps = part.ln_vision_eps
    report.filled = sorted(merged)
    if target_keys is not None:
        _compare_with_target(merged, report, target_keys)
    return merged, report


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
              strict: bool = True) -> tuple[list[str], list[str]]:
    """Load the entries of ``state_dict`` under ``prefix`` (prefix stripped) into ``module``; returns ``(missing,
    unexpected)``. With ``strict`` any missing or unexpected key is an error listing them all; a wrong shape always is.
    """
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return load_state(module, sub, f"converted weights (prefix {prefix!r})", missing_ok=not strict,
                      unexpected_ok=not strict)
