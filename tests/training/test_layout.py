"""Layout: serving code (app/, model/) never imports the training package, and the old module paths are gone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["app", "model"])
def test_serving_code_does_not_import_training(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {
        str(f.relative_to(ROOT)): sorted(m for m in _imported_modules(f) if m.split(".")[0] == "training")
        for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_training_modules_live_in_training_only() -> None:
    for name in ("train", "evaluate", "depth_study"):
        assert (ROOT / "training" / f"{name}.py").is_file()
        assert not (ROOT / "model" / f"{name}.py").exists()
