"""The signal modality: device-status data, its builder's checks, the sequence interface, and the composite."""

import json
import random

import pytest
import torch

from xllm.datasets.config import resolve_datasets
from xllm.models.config import resolve_model
from xllm.datasets.build import build_split
from xllm.world.device import CHANNELS, STATES, answer, command_report, parse_command, sample_status
from xllm.world.signals import WorldSignalSpec, generate_records
from xllm.models.builder import build_model
from xllm.models.interfaces.sequence import SequenceInterface
from xllm.models.trainable import apply_trainable

SIGNAL = {"encoder": {"name": "signal", "channels": 4},
          "interface": {"name": "sequence", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                        "num_query_tokens": 3, "max_steps": 32}}
WORLD = {"seed": 0, "num_train": 12, "num_val": 4, "num_test": 4, "steps": 16}


def test_every_state_shows_in_its_series_and_commands_parse():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        state, series = sample_status(rng)
        seen.add(state)
        assert len(series) == 16 and all(len(row) == len(CHANNELS) for row in series)
        battery, temperature, network, volume = zip(*series)
        assert (battery[-1] < 15) == (state == "battery_low")
        assert (temperature[-1] > 45) == (state == "overheating")
        assert (network[-1] < 0.2) == (state == "network_weak")
        assert (volume[-1] == 0) == (state == "muted")
        assert parse_command(answer(state)) == state
    assert seen == set(STATES)
    assert answer("battery_low") == "the battery is low: enable power saving."
    assert command_report([answer("muted"), answer("normal")], ["the sound is muted: turn the volume up.", "hm"]) == \
        {"accuracy_command": 0.5}
    assert generate_records(WorldSignalSpec(**WORLD)) == generate_records(WorldSignalSpec(**WORLD))


def test_builder_normalises_and_names_a_sample_with_wrong_channels(tmp_path):
    datasets = resolve_datasets({"status": {"builder": "signal_text", "world": WORLD, "storage": str(tmp_path)}})
    dataset = build_split(datasets, "train")["status"]
    sample = dataset[0]
    record = json.loads((tmp_path / "annotations" / "train.json").read_text())[0]
    assert sample["signal"].shape == (4, 16)
    assert sample["signal"][0, 0].item() == pytest.approx((record["signal"][0][0] - 50.0) / 30.0, abs=1e-5)
    assert sample["answer"] == record["answer"]
    assert dataset.lengths() == [16.0] * len(dataset) and dataset.modality == "signal"  # steps, for grouping

    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    records = [{"id": "ok", "signal": [[1, 2, 3, 4]] * 3, "answer": "a."},
               {"id": "three", "signal": [[1, 2, 3]] * 3, "answer": "b."}]
    (bad / "annotations" / "train.json").write_text(json.dumps(records))
    datasets = resolve_datasets({"status": {"builder": "signal_text", "storage": str(bad)}})
    with pytest.raises(ValueError, match=r"record 1 \(id 'three'\) in .*train\.json: signal has 3 channel\(s\) per "
                                         r"step, the config expects channels=4"):
        build_split(datasets, "train")


def test_sequence_interface_ignores_padding_and_offers_per_step_outputs():
    torch.manual_seed(0)
    cfg = SequenceInterface.Config(hidden_size=16, num_layers=1, num_heads=2, num_query_tokens=3, max_steps=32)
    interface = SequenceInterface(4, cfg).eval()
    series = torch.randn(1, 10, 4)
    padded = torch.cat([series, torch.full((1, 6, 4), 9.0)], dim=1)
    alone, alone_mask = interface(series, torch.ones(1, 10, dtype=torch.bool))
    with_pad, _ = interface(padded, torch.arange(16)[None] < 10)
    assert alone.shape == (1, 3, 16) and alone_mask.all()
    assert torch.allclose(alone, with_pad, atol=1e-5)
    per_step = SequenceInterface(4, SequenceInterface.Config(hidden_size=16, num_layers=1, num_heads=2,
                                                             num_query_tokens=0)).eval()
    out, mask = per_step(padded, torch.arange(16)[None] < 10)
    assert out.shape == (1, 16, 16) and mask.sum() == 10


def test_signal_joins_the_composite_by_configuration(micro_model_cfg, tmp_path):
    torch.manual_seed(0)
    cfg = dict(micro_model_cfg, model_type="tiny_signal", modalities={"signal": SIGNAL},
               trainable=["interfaces.signal", "adapters.signal"])
    model = build_model(resolve_model(cfg))
    datasets = resolve_datasets({"status": {"builder": "signal_text", "world": WORLD, "storage": str(tmp_path)}})
    batch = model.collator()([build_split(datasets, "train")["status"][i] for i in range(4)])
    assert batch.media["signal"].shape == (4, 4, 16)
    trainable = apply_trainable(model, list(cfg["trainable"]))
    model.train()
    assert trainable and all(n.startswith(("interfaces.signal.", "adapters.signal.")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    model.eval()
    answers = model.generate({"prompt": ["<Signal><SignalHere></Signal> What should I do?"],
                              "signal": batch.media["signal"][:1]}, max_new_tokens=3)
    assert len(answers) == 1
    with pytest.raises(ValueError, match=r"signal input must be \[batch, 4 channels, steps\], got \(1, 3, 16\)"):
        model.modality("signal")(torch.zeros(1, 3, 16))


@pytest.mark.parametrize("record, problem", [
    ({"signal": [[1, 2, "x", 4]], "answer": "a."}, "field 'signal' must hold finite numbers only"),
    ({"signal": [[1, 2, float("nan"), 4]], "answer": "a."}, "field 'signal' must hold finite numbers only"),
    ({"signal": [[1, 2, True, 4]], "answer": "a."}, "field 'signal' must hold finite numbers only"),
    ({"signal": [[1, 2, 3, 4]], "answer": None}, "field 'answer' must be a non-empty string, got None"),
    ({"signal": [[1, 2, 3, 4]], "answer": " "}, "field 'answer' must be a non-empty string"),
])
def test_a_signal_record_of_the_wrong_type_is_named(tmp_path, record, problem):
    (tmp_path / "annotations").mkdir()
    # json.dumps writes NaN for float("nan"), as Python's and many other writers do; the reader must refuse it.
    (tmp_path / "annotations" / "train.json").write_text(json.dumps([{"id": "bad", **record}]))
    datasets = resolve_datasets({"status": {"builder": "signal_text", "storage": str(tmp_path)}})
    with pytest.raises(ValueError, match=r"record 0 \(id 'bad'\) in .*train\.json: " + problem):
        build_split(datasets, "train")
