"""The project's layering, read from its source: imports point downward only and never go round in a circle.

config -> builders -> model; data -> collator -> Batch -> model -> loss. ``common`` imports nothing of the
project; a model knows no dataset, task, runner or metric; a dataset knows no model, task, runner or metric.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xllm"

# What each layer may import (besides itself); the zoo, which pre-trains the tiny tier, may use anything.
ALLOWED = {
    "common": set(),
    "processors": {"common"},
    "world": {"common", "processors"},
    "models": {"common", "processors"},
    "datasets": {"common", "processors", "world"},
    "eval": {"common", "world"},
    "tasks": {"common", "processors", "models", "eval"},
    "runners": {"common"},
    "config": {"common", "models", "datasets", "eval", "tasks"},
    "plan": {"common", "models", "config", "runners"},
    "cache_features": {"common", "processors", "models", "datasets"},
    "demo": {"common", "processors", "models"},
    "serve": {"demo"},
    "infer": {"common", "processors", "models", "demo"},
    "plot": {"common", "world", "eval"},
    "export": {"common", "models"},
}
# Entry points inside a package that build a model from a run config, as evaluate.py does, and so may import any
# layer; only their own package's command line imports them.
ENTRY_POINTS = {"xllm.eval.llava_bench_answer"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at the top or inside functions (``from a import b``: ``a.b`` when
    that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("xllm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xllm"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(target if target in known else node.module)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "xllm"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def test_the_source_is_read(graph):
    assert {"xllm.models.xllm", "xllm.processors.collator", "xllm.common.registry"} <= set(graph)
    assert "xllm.processors.batch" in graph["xllm.models.xllm"]


def test_imports_point_downward_only(graph):
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items()
                   if layer(module) in ALLOWED and module not in ENTRY_POINTS for target in targets
                   if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)])
    assert not wrong, "\n".join(wrong)


def test_entry_points_are_imported_by_their_command_line_only(graph):
    importers = {entry: sorted(m for m, targets in graph.items() if entry in targets) for entry in ENTRY_POINTS}
    assert importers == {"xllm.eval.llava_bench_answer": ["xllm.eval.llava_bench"]}


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target in graph and target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def loaded_after(code: str) -> set[str]:
    """The project's and torch's modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport sys\nprint(' '.join(m for m in sys.modules if m.startswith(('xllm', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    return set(out.stdout.split())


def test_checking_a_model_section_imports_models_only():
    loaded = loaded_after("from xllm.models.config import resolve_model\nresolve_model({'model_type': 'tiny_all'})")
    assert "xllm.models.encoders.whisper" in loaded  # every model component registered
    assert not {layer(m) for m in loaded if m.startswith("xllm.")} - {"xllm", "common", "processors", "models"}


def test_import_xllm_stays_light():
    assert not any(m == "torch" or m.startswith("xllm.") for m in loaded_after("import xllm"))


def test_benchmarks_import_with_the_package_dependencies_only():
    """A benchmark runs on an installed xllm without the test extras: importing each (not running it) with pytest
    made unimportable succeeds."""
    benchmarks = sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
    assert benchmarks
    # As ``python benchmarks/X.py`` runs them: their folder on the path (a benchmark may import a sibling).
    script = ("import importlib.util, sys\nsys.modules['pytest'] = None\nsys.path.insert(0, 'benchmarks')\n"
              f"for path in {[str(p) for p in benchmarks]!r}:\n"
              "    spec = importlib.util.spec_from_file_location('benchmark', path)\n"
              "    module = sys.modules['benchmark'] = importlib.util.module_from_spec(spec)\n"  # as an import does
              "    spec.loader.exec_module(module)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-2000:]
