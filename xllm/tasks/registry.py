"""The tasks a config's ``run.task`` names; importing ``xllm.tasks`` fills it."""

from xllm.common.registry import Registry

TASKS = Registry("task")
register_task = TASKS.register
