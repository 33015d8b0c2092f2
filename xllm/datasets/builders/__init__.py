"""One builder per data format: caption JSON and webdataset shards, ASR corpora, speech instructions, mASR,
video captions, signals, and the world's questions and dialogues."""

from xllm.datasets.builders import (asr, caption, masr, signal, speech_instruction, video,  # noqa: F401
                                    world_qa)
