"""The mini tier's one built component: the image encoder (``zoo:mini/image_encoder``). Its LLM, speech encoder
and text encoder are real pretrained models (``xllm.models.sources``)."""

from __future__ import annotations

from xllm.zoo.mini_image_encoder import MiniEncoderRecipe, build_mini_image_encoder
from xllm.zoo.tier import Tier

TIER = Tier("mini", {"image_encoder": (MiniEncoderRecipe(), build_mini_image_encoder)})
