"""The core's layers (docs/ARCHITECTURE.md) hold, it has no import cycle, never imports the
tracks and names none of them; importing the package runs nothing.

Every ``import`` in strlowrank/*.py counts, at module level or inside a function (also under
``if TYPE_CHECKING``): ``import a.b``, ``from a import b``, ``from . import b``,
``from .b import c``.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "strlowrank"
TRACKS = ("vision", "speech")

# Every module of the core in exactly one group (docs/ARCHITECTURE.md has the same list).
LAYERS = {
    "method": {
        "threshold",
        "pruning",
        "lowrank",
        "fastgrnn",
        "rnn",
        "allocation",
        "budget",
        "cache",
        "group_threshold",
        "channel_groups",
    },
    "training": {
        "engine",
        "train_config",
        "callbacks",
        "optim",
        "config",
        "cli",
        "checkpoint",
        "distributed",
        "controller",
        "controller_config",
        "measures",
        "threshold_shift",
    },
    "export": {
        "export",
        "gru_cpp",
        "sparse_cnn_ops",
        "timing",
        "onnx_export",
        "structured_export",
    },
    "analysis": {"analysis", "plotting", "report", "sweep", "launch", "tracks"},
}
# Groups a group may import besides itself; "package" is strlowrank/__init__.py, the facade.
ALLOWED = {
    "method": set(),
    "training": {"method"},
    "export": {"method"},
    "analysis": {"method"},
    "package": {"method", "training"},
}


def module_name(path: Path) -> str:
    """strlowrank/engine.py -> "strlowrank.engine"; strlowrank/__init__.py -> "strlowrank"."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Every module that ``module``'s source imports, anywhere in its tree, as absolute names.

    ``from a import b`` counts as importing ``a.b`` when that is a module in ``known``, else
    ``a``; relative imports are resolved against ``module``'s package.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append(sub if sub in known else source)
    return found


def import_graph() -> dict[str, list[str]]:
    """strlowrank module -> the modules it imports (any package)."""
    paths = sorted((ROOT / PACKAGE).rglob("*.py"))
    known = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        name = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = imports(tree, name, path.name == "__init__.py", known)
    return graph


def group_of(module: str) -> str | None:
    """The layer of a strlowrank module ("package" for the facade), None if it has none."""
    if module == PACKAGE:
        return "package"
    short = module.removeprefix(PACKAGE + ".")
    return next((g for g, members in LAYERS.items() if short in members), None)


def layer_violations(graph: dict[str, list[str]]) -> list[str]:
    """One line per import that crosses the layers the wrong way (or imports a track)."""
    lines = []
    for module, targets in graph.items():
        group = group_of(module)
        for target in targets:
            if target.split(".")[0] in TRACKS:
                lines.append(f"{module} imports the track module {target}")
            elif target.split(".")[0] == PACKAGE and target != module:
                other = group_of(target)
                if other != group and other not in ALLOWED[group]:
                    lines.append(f"{module} ({group}) imports {target} ({other})")
    return lines


# a track's name where a word starts: "speech", "vision_x", "Speech track", "speech/x",
# "sweep_speech_x" (underscores split words), not "torchvision" or "supervision"
TRACK_WORD = re.compile(rf"(?<![A-Za-z])({'|'.join(TRACKS)})", re.IGNORECASE)


def track_names(source: str) -> list[str]:
    """Every place in ``source`` that names a track: identifiers, strings (docstrings and
    f-string parts included) and comments, as 'line: text'. The core reaches a track only
    through a name it is given (strlowrank.tracks), so it needs none written in it."""
    kinds = {tokenize.NAME, tokenize.STRING, tokenize.COMMENT}
    kinds |= {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}  # Python 3.12 f-strings
    return [
        f"{token.start[0]}: {token.string}"
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type in kinds and TRACK_WORD.search(token.string)
    ]


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a] among the graph's own nodes, or None (depth-first)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if nxt not in graph or nxt == node:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if group_of(m) is None]
    assert not unplaced, (
        f"modules in no layer: {unplaced}; add each to LAYERS here and to docs/ARCHITECTURE.md"
    )


def test_layers_hold():
    violations = layer_violations(import_graph())
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (in-function imports count): " + " -> ".join(cycle)


def test_checks_can_fail():
    """The collector sees in-function and relative imports; the checks flag a bad toy graph."""
    source = (
        "import strlowrank.budget as b\n"
        "from . import cache\n"
        "from .rnn import RNNLayer\n"
        "def f():\n"
        "    from strlowrank import engine, budget_table\n"
        "    import vision.models\n"
    )
    known = {
        "strlowrank",
        "strlowrank.budget",
        "strlowrank.cache",
        "strlowrank.rnn",
        "strlowrank.engine",
    }
    found = imports(ast.parse(source), "strlowrank.lowrank", False, known)
    assert found == [
        "strlowrank.budget",
        "strlowrank.cache",
        "strlowrank.rnn",
        "strlowrank.engine",
        "strlowrank",
        "vision.models",
    ]
    assert imports(ast.parse("from . import engine"), "strlowrank", True, known) == [
        "strlowrank.engine"
    ]
    toy = {
        "strlowrank.lowrank": found,
        "strlowrank.rnn": ["strlowrank.lowrank"],
        "strlowrank.budget": [],
        "strlowrank.cache": [],
        "strlowrank.engine": [],
        "strlowrank": [],
    }
    assert layer_violations(toy) == [
        "strlowrank.lowrank (method) imports strlowrank.engine (training)",
        "strlowrank.lowrank (method) imports strlowrank (package)",
        "strlowrank.lowrank imports the track module vision.models",
    ]
    assert find_cycle(toy) == ["strlowrank.lowrank", "strlowrank.rnn", "strlowrank.lowrank"]
    toy["strlowrank.rnn"] = []
    assert find_cycle(toy) is None
    assert group_of("strlowrank.new_module") is None


def test_core_names_no_track():
    found = [
        f"{path.relative_to(ROOT)}:{hit}"
        for path in sorted((ROOT / PACKAGE).rglob("*.py"))
        for hit in track_names(path.read_text())
    ]
    assert not found, "the core names a track (reach it through strlowrank.tracks):\n" + "\n".join(
        found
    )


def test_track_name_check_can_fail():
    """The checker finds a track's name in a mapping, a path, an identifier, an f-string part, a
    docstring and a comment, and passes the ways the core legitimately reaches a track."""
    source = (
        'SCRIPTS = {"speech": "speech/train_gru.py", "x": "vision/train.py"}\n'
        "def f(vision_runs, track):\n"
        '    """Speech track only."""\n'
        '    return f"speech_{track}.png"  # vision: sparsity\n'
    )
    found = track_names(source)  # an f-string is one token before Python 3.12, parts after
    assert [int(hit.split(":")[0]) for hit in found] == [1, 1, 1, 2, 3, 4, 4]
    assert {'1: "speech/train_gru.py"', "2: vision_runs", "4: # vision: sparsity"} <= set(found)
    clean = (
        "import importlib, torchvision\n"
        "def part(track: str):\n"
        '    """A supervision of the track\'s module."""\n'
        '    return importlib.import_module(f"{track}.report")  # the track names itself\n'
    )
    assert track_names(clean) == []


def test_import_has_no_side_effects():
    code = (
        "import sys, torch, strlowrank\n"
        "assert not any(m.split('.')[0] in ('vision', 'speech', 'matplotlib', 'onnx')\n"
        "               or m in ('strlowrank.export', 'strlowrank.gru_cpp') for m in sys.modules)\n"
        "import strlowrank.engine, strlowrank.cli, strlowrank.budget, strlowrank.export\n"
        "assert not any(m.split('.')[0] in ('vision', 'speech') for m in sys.modules)\n"
        "assert not torch.distributed.is_available() or not torch.distributed.is_initialized()\n"
        "assert not hasattr(torch.ops.strlowrank_gru, 'forward')  # nothing compiled or loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_public_functions_stay_short():
    """No public function of the core or the tracks is longer than 60 lines (helpers with
    a leading underscore are the way to split one)."""
    long = []
    for folder in ("strlowrank", "vision", "speech"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if not node.name.startswith("_") and length > 60:
                        long.append(f"{path.relative_to(ROOT)}:{node.name} ({length})")
    assert not long, "public functions over 60 lines: " + ", ".join(long)
