"""The import layers: the method library and the memory stand alone (nothing in them imports
`editserve`), and the engine knows no method (nothing in `editserve/engine` imports `methods`).
Every import statement counts, function-level and relative ones included."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (a folder of the tree, a top-level package nothing in it may import)
RULES = [
    ("methods", "editserve"),
    ("memory", "editserve"),
    ("editserve/engine", "methods"),
]


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of each import in `path` (under `root`); relative imports
    resolved."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])


def offending_imports(folder: str, forbidden: str, root: Path = ROOT) -> list[str]:
    sources = sorted((root / folder).rglob("*.py"))
    assert sources, f"no Python files under {folder}: the rule checks nothing"
    return [
        f"{path.relative_to(root)}:{line} imports {module}"
        for path in sources
        for line, module in imported_modules(path, root)
        if module == forbidden or module.startswith(forbidden + ".")
    ]


@pytest.mark.parametrize(("folder", "forbidden"), RULES, ids=[f"{f}-{b}" for f, b in RULES])
def test_a_layer_imports_nothing_from_the_one_it_must_not_know(folder: str, forbidden: str) -> None:
    offending = offending_imports(folder, forbidden)
    assert not offending, f"{folder} must import nothing from {forbidden}: " + "; ".join(offending)


def test_the_check_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    # A rule that cannot see an import would pass for the wrong reason.
    (tmp_path / "editserve" / "engine").mkdir(parents=True)
    (tmp_path / "editserve" / "engine" / "probe.py").write_text(
        "from . import sampling\n"
        "def f():\n"
        "    import methods.rome\n"
        "    from methods.base import ParamDelta\n"
    )
    assert offending_imports("editserve/engine", "methods", tmp_path) == [
        "editserve/engine/probe.py:3 imports methods.rome",
        "editserve/engine/probe.py:4 imports methods.base",
    ]
    assert offending_imports("editserve/engine", "editserve.engine", tmp_path) == [
        "editserve/engine/probe.py:1 imports editserve.engine"
    ]
