"""Frozen encoders: images (a ViT in BLIP-2's layout), video frames, speech (Whisper), numeric signals."""

from xllm.models.encoders import frames, signal, vision, whisper  # noqa: F401  (registration)
