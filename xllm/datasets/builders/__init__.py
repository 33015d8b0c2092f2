"""One builder per data format: caption JSON and webdataset shards, ASR corpora, speech instructions, mASR,
video captions, signals, the world's questions and dialogues, and LLaVA-Bench's questions."""

from xllm.datasets.builders import (asr, caption, llava_bench, masr, signal, speech_instruction,  # noqa: F401
                                    video, world_qa)
