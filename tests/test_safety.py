"""Safe by construction, checked over the package's source: weights load without running code, no remote code,
no shell."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xllm"
SCRIPTS = [PACKAGE.parent / name for name in ("train.py", "evaluate.py")] + sorted((PACKAGE.parent / "scripts").glob("*.py"))


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            yield node


def name_of(function: ast.expr) -> str:
    if isinstance(function, ast.Attribute):
        return f"{name_of(function.value)}.{function.attr}"
    return function.id if isinstance(function, ast.Name) else ""


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + [p for p in SCRIPTS if p.is_file()]


def test_every_torch_load_reads_weights_only():
    unsafe = [f"{path.relative_to(PACKAGE.parent)}:{call.lineno}" for path in sources() for call in calls(path)
              if name_of(call.func) == "torch.load" and not (isinstance(keyword(call, "weights_only"), ast.Constant) and keyword(call, "weights_only").value is True)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    assert not [p for p in sources() if "import pickle" in p.read_text() or "pickle.load" in p.read_text()]


def test_no_remote_code_and_no_shell():
    remote = [str(p) for p in sources() if "trust_remote_code" in p.read_text(encoding="utf-8")]
    shell = [f"{path.relative_to(PACKAGE.parent)}:{call.lineno}" for path in sources() for call in calls(path)
             if isinstance(keyword(call, "shell"), ast.Constant) and keyword(call, "shell").value is True
             or name_of(call.func) in ("os.system", "os.popen")]
    assert not remote and not shell, (remote, shell)
