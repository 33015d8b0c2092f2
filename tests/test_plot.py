"""Pictures of runs and evaluations: the counts behind them, and the files written."""

import json
from dataclasses import replace

import pytest

from xllm.plot import MISSING, confusion_tables, confusions, curves, llava_bench_bars
from xllm.world.scenes import Scene, Shape, caption as scene_caption

pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'xllm[plot]'")


def caption(*shapes: Shape) -> str:
    return scene_caption(Scene(tuple(shapes)), "en")


RED = Shape("circle", "red", "small", "top left")
BLUE = Shape("square", "blue", "large", "center")


def test_confusions_count_each_reference_shape_against_the_one_named_in_its_place():
    rows = [{"reference": caption(RED, BLUE), "prediction": caption(replace(RED, colour="green"), BLUE)},
            {"reference": caption(BLUE), "prediction": caption(BLUE)},
            {"reference": caption(RED, BLUE), "prediction": caption(RED)},
            {"reference": caption(RED), "prediction": None}]
    counts = confusions(rows)
    assert counts["colour"] == {("red", "green"): 1, ("blue", "blue"): 2, ("red", "red"): 1, ("blue", MISSING): 1,
                                ("red", MISSING): 1}
    assert counts["kind"][("circle", "circle")] == 2 and sum(counts["kind"].values()) == 6


def test_curves_and_confusion_tables_are_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "split": "train", "loss": 2.0 / s, "loss/caption": 2.5 / s, "lr": 1e-3} for s in range(1, 6)]
    rows.append({"step": 5, "split": "val", "loss": 0.5})
    (run / "log.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert curves(run, tmp_path / "c.png").stat().st_size > 10_000
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "predictions.jsonl").write_text(json.dumps({"reference": caption(RED), "prediction": caption(BLUE)}))
    assert confusion_tables(evaluation, tmp_path / "t.png").stat().st_size > 10_000
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "split": "val", "loss": 1.0}))
    with pytest.raises(ValueError, match="no training rows"):
        curves(run, tmp_path / "x.png")


def test_llava_bench_bars_are_drawn_from_a_review_file(tmp_path):
    reviews = [{"question_id": i, "category": category, "tuple": [6.0, 8.0]}
               for i, category in enumerate(["conv", "detail", "complex"])]
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps(reviews))
    assert llava_bench_bars(path, tmp_path / "bars.png").stat().st_size > 10_000
