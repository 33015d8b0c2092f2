"""X2L interfaces: Q-Former (with its stage-1 text branch), video Q-Former, C-Former (CIF), sequence."""

from xllm.models.interfaces import cformer, qformer, qformer_text, sequence, video_qformer  # noqa: F401
