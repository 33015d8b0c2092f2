"""Writes the world's image splits to disk in the formats real data comes in.

Each split is stored twice, so that one builder of each kind is exercised on it:
- ``annotations/{split}.json``: a COCO-caption (Karpathy) style list of ``{"image", "caption", "image_id"}``
  with PNG files under ``images/{split}/``, plus world extras (``caption_zh``, ``scene``, ``qa``);
- ``shards/{split}-NNNNNN.tar``: webdataset shards holding ``png``, ``txt`` (caption) and ``json`` (extras).

Test scenes never repeat a training scene, so held-out scores measure generalisation, not recall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from xllm.world.splits import SPLITS, unique_draws, write_splits
from xllm.world.render import RENDER_VERSION, render
from xllm.world.scenes import Scene, caption_en, caption_zh, question_answers, sample_scene


@dataclass(frozen=True)
class WorldImageSpec:
    seed: int = 0
    num_train: int = 4000
    num_val: int = 200
    num_test: int = 300
    image_size: int = 64
    max_shapes: int = 3
    shard_size: int = 1000
    render_version: int = RENDER_VERSION


def generate_records(spec: WorldImageSpec) -> dict[str, list[dict]]:
    """Scenes, captions and QA per split (no pixels); the scene sets of the three splits are disjoint."""
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for split, index, scene, rng in unique_draws(spec, f"{spec.seed}/", lambda rng: sample_scene(rng, spec.max_shapes)):
        image_id = f"{split}_{index:06d}"
        records[split].append({"image": f"images/{split}/{image_id}.png", "caption": caption_en(scene),
                               "image_id": image_id, "caption_zh": caption_zh(scene), "scene": scene.to_dict(),
                               "qa": [list(pair) for pair in question_answers(scene, rng)],
                               "render_seed": rng.randrange(2**31)})
    return records


def write_world_images(spec: WorldImageSpec, root: Path) -> None:
    """Renders every split under ``root``, as PNG files and as shards (see ``write_splits``)."""
    def write_files(root: Path, split: str, rows: list[dict]) -> None:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "shards").mkdir(exist_ok=True)
        with wds.ShardWriter(str(root / "shards" / f"{split}-%06d.tar"), maxcount=spec.shard_size, verbose=0) as sink:
            for row in rows:
                image = render(Scene.from_dict(row["scene"]), spec.image_size, random.Random(row["render_seed"]))
                image.save(root / row["image"])
                extras = {k: row[k] for k in ("caption_zh", "scene", "qa", "image_id")}
                sink.write({"__key__": row["image_id"], "png": image, "txt": row["caption"], "json": extras})

    write_splits(spec, root, "images", generate_records, write_files, ensure_ascii=False, indent=0)
