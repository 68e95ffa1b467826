"""The library's layout rules: no mlflow in imgsearch/, and a stage package never imports a later one."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "imgsearch"
#: the stage order (README "where things live"); top-level modules come first
ORDER = ("", "data", "models", "embed", "evaluate", "train", "search", "categorize", "monitor")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else ""


def test_library_never_imports_mlflow_nor_a_later_stage() -> None:
    problems = []
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(LIBRARY)
        own = rel.parts[0] if len(rel.parts) > 1 else ""
        assert own in ORDER, f"{rel}: package {own!r} is not in the stage order"
        for name in _imports(path):
            if name.split(".")[0] == "mlflow":
                problems.append(f"{rel} imports {name}")
            if name.startswith("imgsearch.") and ORDER.index(_stage(name)) > ORDER.index(own):
                problems.append(f"{rel} ({own or 'top'}) imports the later stage {name}")
    assert not problems, "\n".join(problems)
