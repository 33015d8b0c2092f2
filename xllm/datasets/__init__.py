"""Datasets: builders per format, the ratio mixture, the loaders. Importing the package registers every builder."""

from xllm.datasets import builders  # noqa: F401  (registration)
