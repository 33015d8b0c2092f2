"""Frozen LLM backends: any Hugging Face causal LM, and the native ChatGLM-6B."""

from xllm.models.llm import chatglm_backend, hf_causal  # noqa: F401  (registration)
