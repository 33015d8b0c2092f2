"""The tiny tier: small models pre-trained on the synthetic world (``zoo:tiny/<name>``)."""

from __future__ import annotations

from xllm.zoo.image_encoder import TinyEncoderRecipe, build_image_encoder
from xllm.zoo.speech import TinySpeechEncoderRecipe, build_speech_encoder
from xllm.zoo.text_tokenizer import TinyTextTokenizerRecipe, build_text_tokenizer
from xllm.zoo.tier import Tier
from xllm.zoo.tiny_chatglm import TinyChatGLMRecipe, build_chatglm_llm
from xllm.zoo.tiny_llm import TinyLLMRecipe, build_llm

TIER = Tier("tiny", {
    "llm": (TinyLLMRecipe(), build_llm),
    "image_encoder": (TinyEncoderRecipe(), build_image_encoder),
    "text_tokenizer": (TinyTextTokenizerRecipe(), build_text_tokenizer),
    "speech_encoder": (TinySpeechEncoderRecipe(), build_speech_encoder),
    "chatglm_llm": (TinyChatGLMRecipe(), build_chatglm_llm),
})
