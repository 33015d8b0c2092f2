"""Imports every module that registers a component, so configs can name any of them."""

import xllm.datasets.builders.asr  # noqa: F401
import xllm.datasets.builders.caption  # noqa: F401
import xllm.models.adapters  # noqa: F401
import xllm.models.encoders.vision  # noqa: F401
import xllm.models.encoders.whisper  # noqa: F401
import xllm.models.interfaces.qformer  # noqa: F401
import xllm.models.llm.chatglm_backend  # noqa: F401
import xllm.models.llm.hf_causal  # noqa: F401
import xllm.processors.audio  # noqa: F401
import xllm.processors.image  # noqa: F401
import xllm.processors.text  # noqa: F401
import xllm.tasks.image_text  # noqa: F401
