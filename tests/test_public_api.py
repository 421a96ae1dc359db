"""The package's re-exports (strlowrank/__init__.py) and the imports the documentation shows."""

from __future__ import annotations

import ast
import contextlib
import importlib
import re
from pathlib import Path

import pytest

import strlowrank

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "strlowrank"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _import_nodes(block: str) -> list[ast.stmt]:
    """The import statements of a code block (line by line when the block is not valid Python)."""
    try:
        trees = [ast.parse(block)]
    except SyntaxError:
        trees = []
        for line in block.splitlines():
            with contextlib.suppress(SyntaxError):
                trees.append(ast.parse(line.strip()))
    return [n for t in trees for n in ast.walk(t) if isinstance(n, (ast.Import, ast.ImportFrom))]


def documented_imports(path: Path) -> list[tuple[str, str, list[str]]]:
    """(statement, module, imported names) for each strlowrank import in the python code blocks
    of a markdown document."""
    found = []
    for lang, block in FENCE.findall(path.read_text()):
        if lang not in ("python", "py"):
            continue
        for node in _import_nodes(block):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
                found.append((ast.unparse(node), node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [
                    (ast.unparse(node), a.name, [])
                    for a in node.names
                    if a.name.split(".")[0] == PACKAGE
                ]
    return found


def test_all_is_importable_and_unique() -> None:
    names = strlowrank.__all__
    assert len(names) == len(set(names)), "a name is listed twice in __all__"
    assert "budget_table" in names and "apply_soft_threshold" in names
    for name in names:
        obj = getattr(strlowrank, name)
        home = importlib.import_module(obj.__module__)
        assert getattr(home, name) is obj, f"strlowrank.{name} is not {obj.__module__}.{name}"
    namespace: dict = {}
    exec("from strlowrank import *", namespace)
    assert set(names) <= set(namespace)


def test_readme_imports_work_and_are_shortest() -> None:
    statements = documented_imports(ROOT / "README.md")
    assert len(statements) >= 2, "README.md shows no strlowrank imports any more"
    for path in DOCUMENTS:
        for statement, module, names in documented_imports(path):
            exec(statement, {})  # ImportError names the missing module or name
            shorter = set(names) & set(strlowrank.__all__) if module != PACKAGE else set()
            assert not shorter, f"{path.name}: {statement!r}: {sorted(shorter)} from {PACKAGE}"


def test_documented_imports_parse_code_blocks(tmp_path) -> None:
    path = tmp_path / "README.md"
    path.write_text(
        "text\n```python\nfrom strlowrank import (a,\n    b)\nimport strlowrank.c, torch\n```\n"
        "```python\nfrom strlowrank.x import y\n... not python\n```\n"
        "```bash\nfrom strlowrank import d\n```\n"
    )
    assert documented_imports(path) == [
        ("from strlowrank import a, b", "strlowrank", ["a", "b"]),
        ("import strlowrank.c, torch", "strlowrank.c", []),
        ("from strlowrank.x import y", "strlowrank.x", ["y"]),
    ]
    with pytest.raises(ImportError):
        exec("from strlowrank import no_such_name", {})
