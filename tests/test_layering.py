"""Import layering: lower layers never import higher ones (no import cycles, issue 9's "Also").

    ops  <  layers  <  models  <  runtime / spec  <  train, bundle, evaluate  <  serve  <  cli

Every `import` / `from ... import` in a module of a lower package (also inside functions) is checked by reading the
source, so a lazy import that would hide a cycle at run time fails here too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gdnspec"
RANK = {"ops": 0, "cache": 0, "layers": 1, "models": 2, "runtime": 3, "spec": 3, "generate": 3, "sampling": 0,
        "concurrency": 0, "train": 4, "bundle": 4, "evaluate": 5, "serve": 6, "cli": 7}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "gdnspec" else None


@pytest.mark.parametrize("package", ["ops", "layers", "models", "runtime", "spec", "train"])
def test_lower_layers_do_not_import_higher_ones(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                unit = _unit(name)
                if unit in RANK and RANK[unit] > RANK[package]:
                    bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_only_the_command_line_imports_the_server():
    """gdnspec.serve (and its web dependencies) is the top layer: no module outside it but cli.py imports it."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "serve" or rel.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{rel} imports {n}" for n in names if _unit(n) == "serve" or n.split(".")[0] in
                    ("fastapi", "uvicorn", "starlette", "prometheus_client", "jinja2")]
    assert not bad, "\n".join(bad)
