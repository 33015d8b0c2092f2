"""The processors a model config names per modality (``model.modalities.<m>.processor``)."""

from xllm.common.registry import Registry

PROCESSORS = Registry("processor")
register_processor = PROCESSORS.register
