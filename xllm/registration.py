"""Imports every module that registers a component, so configs can name any of them."""

import xllm.datasets.builders.asr  # noqa: F401
import xllm.datasets.builders.caption  # noqa: F401
import xllm.datasets.builders.speech_instruction  # noqa: F401
import xllm.models.adapters  # noqa: F401
import xllm.models.encoders.vision  # noqa: F401
import xllm.models.encoders.whisper  # noqa: F401
import xllm.models.interfaces.cformer  # noqa: F401
import xllm.models.interfaces.qformer  # noqa: F401
import xllm.models.interfaces.qformer_text  # noqa: F401
import xllm.models.llm.chatglm_backend  # noqa: F401
import xllm.models.llm.hf_causal  # noqa: F401
import xllm.processors.audio  # noqa: F401
import xllm.processors.image  # noqa: F401
import xllm.processors.text  # noqa: F401
import xllm.tasks.image_text  # noqa: F401
import xllm.tasks.speech  # noqa: F401
import xllm.tasks.qformer_pretrain  # noqa: F401
import xllm.datasets.builders.video  # noqa: F401
import xllm.datasets.builders.signal  # noqa: F401
import xllm.datasets.builders.world_qa  # noqa: F401
import xllm.models.encoders.frames  # noqa: F401
import xllm.models.encoders.signal  # noqa: F401
import xllm.models.interfaces.video_qformer  # noqa: F401
import xllm.models.interfaces.sequence  # noqa: F401
import xllm.processors.video  # noqa: F401
import xllm.tasks.multitask  # noqa: F401
