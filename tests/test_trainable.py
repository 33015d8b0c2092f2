import pytest
import torch
from omegaconf import OmegaConf

from xllm.models.config import resolve_model
from xllm.models.builder import build_model
from xllm.models.trainable import apply_trainable, set_train_mode
from xllm.runners.runner import parameter_table


@pytest.fixture()
def model(micro_model_cfg):
    torch.manual_seed(0)
    return build_model(resolve_model(OmegaConf.create(micro_model_cfg)))


def test_manifest_trains_only_what_it_names_and_frozen_modules_stay_in_eval(model):
    names = apply_trainable(model, ["interfaces.image", "adapters.*"])
    assert not any(m.training for m in model.modules())  # built in eval mode
    model.train()  # the composite's train(): only what trains leaves eval mode
    assert names and all(n.startswith(("interfaces.image.", "adapters.image.")) for n in names)
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not model.llm.training and not model.encoders["image"].training
    assert model.interfaces["image"].training and model.adapters["image"].training
    dropouts = [m for m in model.interfaces["image"].modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)
    model.eval()
    assert not any(m.training for m in model.modules())
    set_train_mode(model, training=True)
    assert model.interfaces["image"].training and not model.llm.training
    table = parameter_table(model)
    assert "interfaces.image" in table and "llm.model" in table


def test_a_step_changes_only_trainable_parameters(model):
    apply_trainable(model, ["adapters.image"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(model.make_batch({"image": torch.randn(2, 3, 32, 32),
                                  "prompt": ["<Image><ImageHere></Image> Describe."] * 2,
                                  "answer": ["a red circle.", "a blue star."]}, with_answers=True))
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"adapters.image.weight", "adapters.image.bias"}


def test_a_pattern_matching_nothing_is_an_error(model):
    with pytest.raises(ValueError, match="'interface.image' matches no parameter"):
        apply_trainable(model, ["interface.image"])
