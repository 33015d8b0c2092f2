"""Tasks: which objective a stage optimises and how its evaluation scores the model. Importing the package
registers every task."""

from xllm.tasks import base, retrieval  # noqa: F401  (registration)
