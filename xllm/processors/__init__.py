"""Turning files into tensors (image, audio, video, signal, text) and samples into a ``Batch``.

Importing the package registers every processor.
"""

from xllm.processors import audio, image, signal, text, video  # noqa: F401  (registration)
