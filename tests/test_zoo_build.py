"""``Tier.build``, ``Tier.missing`` and ``zoo.ensure`` over a stand-in component: the cache marker is written by
``build`` once the builder has returned, and only then."""

import json
from dataclasses import dataclass

import pytest

from xllm import zoo
from xllm.zoo import tiny


@dataclass(frozen=True)
class FakeRecipe:
    size: int = 3


@pytest.fixture
def fake(tmp_path, monkeypatch) -> list:
    """A zoo whose one component, ``fake``, records each recipe it is built with."""
    monkeypatch.setenv("XLLM_CACHE", str(tmp_path))
    built = []

    def builder(folder, recipe) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.txt").write_text(str(recipe.size))
        built.append(recipe)

    monkeypatch.setattr(tiny.TIER, "components", {"fake": (FakeRecipe(), builder)})
    return built


def test_build_marks_a_component_built_and_keeps_it_until_its_recipe_changes(fake, tmp_path, monkeypatch):
    assert tiny.TIER.missing(["fake"]) == ["fake"]
    assert tiny.TIER.build(["fake"]) == tmp_path / "zoo" / "tiny" == tiny.TIER.folder()
    assert json.loads((tiny.TIER.folder() / "fake" / "recipe.json").read_text()) == {"size": 3}
    assert tiny.TIER.missing(["fake"]) == [] and tiny.TIER.missing(["absent"]) == ["absent"]
    tiny.TIER.build(["fake"])
    assert fake == [FakeRecipe()]
    monkeypatch.setitem(tiny.TIER.components, "fake", (FakeRecipe(size=4), tiny.TIER.components["fake"][1]))
    assert tiny.TIER.missing(["fake"]) == ["fake"]


def test_a_rebuild_that_fails_leaves_the_component_missing(fake, monkeypatch):
    tiny.TIER.build(["fake"])

    def failing(folder, recipe) -> None:
        (folder / "weights.txt").write_text("half")
        raise RuntimeError("stopped")

    monkeypatch.setitem(tiny.TIER.components, "fake", (FakeRecipe(), failing))
    with pytest.raises(RuntimeError, match="stopped"):
        tiny.TIER.build(["fake"], force=True)
    assert tiny.TIER.missing(["fake"]) == ["fake"]


def test_ensure_builds_what_a_config_names_and_rejects_unknown_names(fake):
    zoo.ensure({"model": {"llm": {"path": "zoo:tiny/fake"}}})
    zoo.ensure({"model": {"llm": {"path": "zoo:tiny/fake"}}})
    assert fake == [FakeRecipe()] and tiny.TIER.missing(["fake"]) == []
    with pytest.raises(KeyError, match="no component 'absent'"):
        tiny.TIER.build(["absent"])
    with pytest.raises(ValueError, match="unknown zoo tier 'huge'; the zoo builds: tiny, mini"):
        zoo.ensure({"model": {"llm": {"path": "zoo:huge/llm"}}})
