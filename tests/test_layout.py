"""The package's modules import one way only, from framework glue down to pure geometry, and
only ``tilefn.lightning`` imports Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tilefn"

# Lowest first: a module may import (at module level or inside a function) only modules
# that come before it.
ORDER = [
    "_errors",
    "_compat",
    "_options",
    "_geometry",
    "_positions",
    "_rules",
    "_view_rules",
    "_window_rules",
    "_global",
    "_trace",
    "_plan",
    "_planner",
    "_schedule",
    "_inputs",
    "_constant",
    "_spill",
    "_execute",
    "_autograd",
    "_staged",
    "_chain",
    "_api",
    "rules",
    "_calibrate",
    "_split",
    "testing",
    "_training",
    "slides",
    "__init__",
    "lightning",
]


def _tilefn_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tilefn."):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_is_in_the_layer_order() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(ORDER)


def test_imports_go_one_way() -> None:
    wrong = []
    for path in PACKAGE.glob("*.py"):
        rank = ORDER.index(path.stem)
        for imported in _tilefn_imports(path):
            if imported in ORDER and ORDER.index(imported) >= rank:
                wrong.append(f"{path.stem} imports {imported}")
    assert not wrong, wrong


def test_only_the_adapter_imports_lightning() -> None:
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        uses = any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names)
        assert uses == (path.stem == "lightning"), path.name
