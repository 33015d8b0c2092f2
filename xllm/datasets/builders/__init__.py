"""One builder per data format: caption JSON and webdataset shards, ASR corpora, speech instructions, mASR,
video captions, signals, the world's questions and dialogues, LLaVA's conversations and LLaVA-Bench's questions."""

from xllm.datasets.builders import (asr, caption, llava, llava_bench, masr, signal,  # noqa: F401
                                    speech_instruction, video, world_qa)
