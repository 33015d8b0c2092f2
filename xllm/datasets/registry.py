"""The dataset builders a config's ``datasets.<name>.builder`` names; importing ``xllm.datasets`` fills it."""

from xllm.common.registry import Registry

BUILDERS = Registry("dataset builder")
register_builder = BUILDERS.register
