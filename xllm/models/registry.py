"""The model's component tables: encoders, X2L interfaces, adapters, LLM backends, objectives, and the builder
of each arch.

Each component registers itself where it is defined (``@register_encoder("whisper")``); importing
``xllm.models`` imports every component module, so a config's ``model`` section resolves with models alone.
"""

from xllm.common.registry import Registry

ENCODERS = Registry("encoder")
INTERFACES = Registry("interface")
ADAPTERS = Registry("adapter")
LLMS = Registry("llm backend")
OBJECTIVES = Registry("objective")
# The function that builds a composite from its resolved config, by ``model.arch``: the builder imports the
# composite, so the composite's ``from_pretrained`` finds its builder here rather than importing it.
ARCHS = Registry("arch")

register_encoder = ENCODERS.register
register_interface = INTERFACES.register
register_adapter = ADAPTERS.register
register_llm = LLMS.register
register_objective = OBJECTIVES.register
register_arch = ARCHS.register
