"""Every registered encoder, interface, adapter and LLM backend, built from its default config and run forward.

As timm tests every registered model: a component registered without an entry here fails the test, so nothing
can be registered that has never run. Paper-sized defaults get smaller sizes (``SMALL``), nothing else.
"""

import pytest
import torch
from conftest import MICRO_QFORMER
from omegaconf import OmegaConf

from xllm.common.config import typed
from xllm.models.config import LLMConfig
from xllm.models.registry import ADAPTERS, ENCODERS, INTERFACES, LLMS
from xllm.models.xllm import Modality

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64)
# Components whose defaults are the paper's sizes (EVA ViT-g, BERT-base Q-Former), shrunk to run on a CPU.
SMALL = {"blip2_vision": MICRO_VIT, "qformer": MICRO_QFORMER, "qformer_text": MICRO_QFORMER}
WIDTH = 24  # the feature width handed to interfaces and adapters


def build(registry, name: str, options: dict | None = None, **kwargs):
    cls = registry.get(name)
    return cls.build(typed(cls.Config, {**SMALL.get(name, {}), **(options or {})}, name), **kwargs)


def image_modality() -> Modality:
    """An image modality for the components that reuse one (``shares: image``)."""
    encoder = build(ENCODERS, "blip2_vision")
    return Modality(encoder, build(INTERFACES, "qformer", input_dim=encoder.output_dim), torch.nn.Identity())


ENCODER_INPUTS = {
    "blip2_vision": (lambda: torch.randn(2, 3, 32, 32), {}),
    "frames": (lambda: torch.randn(2, 3, 3, 32, 32), {"shared": image_modality}),
    "whisper": (lambda: {"features": torch.randn(2, 80, 40), "lengths": torch.tensor([40, 25])}, {}),
    "signal": (lambda: {"features": torch.randn(2, 4, 10), "lengths": torch.tensor([10, 6])}, {}),
}


@pytest.mark.parametrize("name", ENCODERS.names())
def test_every_encoder_builds_and_encodes(name):
    assert name in ENCODER_INPUTS, f"encoder {name!r} is registered: add an example input to ENCODER_INPUTS"
    make_input, extra = ENCODER_INPUTS[name]
    encoder = build(ENCODERS, name, **{k: v() for k, v in extra.items()}).eval()
    inputs = make_input()
    with torch.no_grad():
        features, mask = encoder(**inputs) if isinstance(inputs, dict) else encoder(inputs)
    assert features.shape[0] == 2 and features.shape[-1] == encoder.output_dim
    assert mask.dtype == torch.bool and mask.shape == features.shape[:-1]
    assert torch.isfinite(features).all()


def interface_kwargs(name: str, micro_text_tokenizer) -> dict:
    """What an interface needs beyond its config: another modality's modules, or a tokenizer folder."""
    if name == "video_qformer":
        return {"shared": image_modality()}
    if name == "qformer_text":
        return {"options": {"tokenizer": str(micro_text_tokenizer)}}
    return {}


# (features [B, T, D] or [B, frames, T, D], mask) each interface reads
INTERFACE_INPUTS = {
    "video_qformer": lambda dim: (torch.randn(2, 3, 5, dim), torch.ones(2, 3, 5, dtype=torch.bool)),
}


@pytest.mark.parametrize("name", INTERFACES.names())
def test_every_interface_builds_and_emits_vectors(name, micro_text_tokenizer):
    extra = interface_kwargs(name, micro_text_tokenizer)
    width = extra["shared"].encoder.output_dim if "shared" in extra else WIDTH
    interface = build(INTERFACES, name, input_dim=width, **extra).eval()
    features, mask = INTERFACE_INPUTS.get(name, lambda dim: (torch.randn(2, 12, dim),
                                                             torch.arange(12)[None] < torch.tensor([[12], [7]])))(width)
    with torch.no_grad():
        out, out_mask = interface(features, mask)
    assert out.shape[0] == 2 and out.shape[-1] == interface.output_dim and out_mask.shape == out.shape[:2]
    assert out_mask.any(dim=1).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ADAPTERS.names())
def test_every_adapter_maps_to_the_llm_width(name):
    adapter = build(ADAPTERS, name, input_dim=WIDTH, output_dim=8)
    assert adapter(torch.randn(2, 5, WIDTH)).shape == (2, 5, 8)


@pytest.mark.parametrize("name", LLMS.names())
def test_every_llm_backend_loads_lays_out_and_generates(name, request):
    folders = {"hf_causal": "micro_zoo", "chatglm": "micro_chatglm"}
    assert name in folders, f"LLM backend {name!r} is registered: add a micro checkpoint folder to this test"
    fixture = request.getfixturevalue(folders[name])
    folder = fixture["llm"] if isinstance(fixture, dict) else fixture
    llm = LLMS.get(name).from_config(OmegaConf.structured(LLMConfig(backend=name, path=str(folder)))).eval()
    layout = llm.layout
    ids, labels = layout.build_sequence(layout.tokenize(layout.format_prompt("Describe the image.")), "a red circle.")
    input_ids = torch.tensor([ids])
    out = llm(input_ids, llm.embed(input_ids), torch.ones_like(input_ids), torch.tensor([labels]))
    assert torch.isfinite(out.loss) and out.row_units.tolist() == [sum(label >= 0 for label in labels[1:])]
    assert llm(input_ids, llm.embed(input_ids), torch.ones_like(input_ids)).logits.shape[:2] == input_ids.shape
    prompt, _ = layout.build_sequence(layout.tokenize(layout.format_prompt("Describe the image.")), None)
    prompt = torch.tensor([prompt])
    generated = llm.generate(prompt, llm.embed(prompt), torch.ones_like(prompt), max_new_tokens=3)
    assert len(generated) == 1 and len(generated[0]) <= 3 and isinstance(llm.decode(generated[0]), str)
