"""docs/ARCHITECTURE.md stays true: the paths it names exist, imports go one way, and no import circle exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "model", "training", "bench")
# who may import whom (the package itself always)
ALLOWED = {"model": set(), "app": {"model"}, "training": {"model"}, "bench": {"app", "model"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any level, TYPE_CHECKING blocks included)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def test_imports_go_one_way() -> None:
    wrong = [
        (mod, dep)
        for mod, deps in _imports().items()
        for dep in deps
        if dep.split(".")[0] != mod.split(".")[0] and dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_import_circle() -> None:
    graph = _imports()
    # a package's __init__ re-exporting its parts is not a circle: drop edges from a package to its own submodules
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_paths_architecture_names_exist() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:app|model|training|bench|deploy|tests|docs)/[A-Za-z0-9_./-]*)`", text))
    assert len(named) > 20
    missing = [p for p in sorted(named) if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, missing


def test_doc_links_resolve() -> None:
    """`python docs/check_links.py`: every relative link and #anchor of the docs points somewhere."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "docs" / "check_links.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
