"""What a stage optimises, computed inside the model's forward: the LLM's answer loss, Q-Former pre-training
(ITC, ITM, ITG), CIF speech recognition."""

from xllm.models.objectives import cif_asr, lm, qformer  # noqa: F401  (registration)
