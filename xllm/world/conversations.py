"""The world's image splits as LLaVA conversations: ``llava/{split}.json`` beside the caption JSON.

Each image is described first and then asked its questions (``qa``), one human/gpt pair per round, in LLaVA's
instruction format (``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``),
so a LLaVA-format builder trains on data whose answers are known.
"""

from __future__ import annotations

import json
from pathlib import Path

from xllm.common.paths import is_current, mark_current, read_utf8
from xllm.world.images import WorldImageSpec, write_world_images
from xllm.world.splits import SPLITS

IMAGE_TOKEN = "<image>"  # where LLaVA's data places the image in a human turn
DESCRIBE = "Describe the image."


def llava_record(record: dict, index: int) -> dict:
    """One world image record (``annotations/{split}.json``) as a LLaVA conversation."""
    # LLaVA's data holds the image token before or after the first question: both occur here, in turn.
    first = f"{IMAGE_TOKEN}\n{DESCRIBE}" if index % 2 == 0 else f"{DESCRIBE}\n{IMAGE_TOKEN}"
    rounds = [(first, record["caption"]), *record["qa"]]
    turns = [{"from": speaker, "value": text} for question, answer in rounds
             for speaker, text in (("human", question), ("gpt", answer))]
    return {"id": record["image_id"], "image": record["image"], "conversations": turns}


def write_world_conversations(spec: WorldImageSpec, root: Path) -> None:
    """The world's images under ``root`` (``write_world_images``) and their conversations in ``root/llava``;
    a ``world.json`` marker written last there says they are complete."""
    write_world_images(spec, root)
    folder = Path(root) / "llava"
    marker = folder / "world.json"
    if is_current(marker, spec):
        return
    folder.mkdir(exist_ok=True)
    for split in SPLITS:
        records = json.loads(read_utf8(Path(root) / "annotations" / f"{split}.json"))
        conversations = [llava_record(record, index) for index, record in enumerate(records)]
        (folder / f"{split}.json").write_text(json.dumps(conversations, indent=0))
    mark_current(marker, spec)
