"""The core's layers (docs/ARCHITECTURE.md) are its folders and hold, it has no import cycle, never
imports the tracks and names none of them; importing the package runs nothing.

Every ``import`` in strlowrank/**/*.py counts, at module level or inside a function (also under
``if TYPE_CHECKING``): ``import a.b``, ``from a import b``, ``from . import b``,
``from .b import c``.
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "strlowrank"
TRACKS = ("vision", "speech")

# The core's layers are its folders: a module's layer is its sub-package,
# strlowrank/<layer>/<module>.py (docs/ARCHITECTURE.md). Groups a group may import besides
# itself; "package" is strlowrank/__init__.py, the facade, and "entry" an entry module.
ALLOWED = {
    "method": set(),
    "training": {"method"},
    "export": {"method"},
    "analysis": {"method"},
    "package": {"method", "training"},
    "entry": {"analysis"},
}
LAYERS = ("method", "training", "export", "analysis")
# The only modules at the top besides the facade: `python -m strlowrank.<name>`, each the command
# line of its twin strlowrank/analysis/<name>.py.
ENTRY_MODULES = {"sweep", "report"}


def module_name(path: Path) -> str:
    """strlowrank/training/engine.py -> "strlowrank.training.engine"; strlowrank/__init__.py ->
    "strlowrank"."""
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
    """The layer of a strlowrank module, read from its name: the sub-package of
    strlowrank.<layer>.<name> (and of strlowrank.<layer> itself); "package" for the facade,
    "entry" for an entry module; None for any other module."""
    if module == PACKAGE:
        return "package"
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) > 3:
        return None
    if len(parts) == 2 and parts[1] in ENTRY_MODULES:
        return "entry"
    return parts[1] if parts[1] in LAYERS else None


def misplaced(package: Path) -> list[str]:
    """One line per module of ``package`` outside the layout: at the top (other than the facade
    and the entry modules), in a folder that is no layer, below a layer's folder; and a layer
    whose folder has no __init__.py."""
    lines = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        where = "/".join(parts)
        if len(parts) == 1 and path.stem not in {"__init__", *ENTRY_MODULES}:
            lines.append(f"{where}: at the top, not in its layer's folder")
        elif len(parts) > 1 and parts[0] not in LAYERS:
            lines.append(f"{where}: {parts[0]}/ is no layer")
        elif len(parts) > 2:
            lines.append(f"{where}: below its layer's folder")
    missing = [g for g in LAYERS if not (package / g / "__init__.py").is_file()]
    return lines + [f"{g}/__init__.py: missing" for g in missing]


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
    through a name it is given (strlowrank.analysis.tracks), so it needs none written in it."""
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
        f"modules in no layer: {unplaced}; move each into its layer's folder (docs/ARCHITECTURE.md)"
    )


def test_the_folders_are_the_layers():
    lines = misplaced(ROOT / PACKAGE)
    assert not lines, "modules outside their layer's folder:\n" + "\n".join(lines)


def test_entry_modules_only_run_their_twins():
    """`python -m strlowrank.<name>` runs its twin's main; the entry module imports nothing else."""
    graph = import_graph()
    for name in ENTRY_MODULES:
        entry, twin = f"{PACKAGE}.{name}", f"{PACKAGE}.analysis.{name}"
        assert [t for t in graph[entry] if t.split(".")[0] == PACKAGE] == [twin], graph[entry]
        assert importlib.import_module(entry).main is importlib.import_module(twin).main


def test_layout_check_can_fail(tmp_path):
    """The layout check flags a stray module, a folder that is no layer, a nested module and a
    layer without its __init__.py; the layer of a module is read from its name."""
    package = tmp_path / PACKAGE
    toy = ["__init__", "stray", "method __init__", "method x", "extra y", "method deep z"]
    for name in toy:  # folders and module names, joined here: this file cites no such path
        path = package.joinpath(*name.split()).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    found = [(where.split("/"), why) for where, why in (m.split(": ") for m in misplaced(package))]
    assert found == [
        (["extra", "y.py"], "extra/ is no layer"),
        (["method", "deep", "z.py"], "below its layer's folder"),
        (["stray.py"], "at the top, not in its layer's folder"),
        (["training", "__init__.py"], "missing"),
        (["export", "__init__.py"], "missing"),
        (["analysis", "__init__.py"], "missing"),
    ]
    top = PACKAGE + "."
    assert [group_of(top + m) for m in ("export", "export.timing", "sweep", "method.x.y")] == [
        "export",
        "export",
        "entry",
        None,
    ]
    assert layer_violations({top + "sweep": [top + "training.engine"]}) == [
        f"{top}sweep (entry) imports {top}training.engine (training)"
    ]


def test_layers_hold():
    violations = layer_violations(import_graph())
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (in-function imports count): " + " -> ".join(cycle)


def test_checks_can_fail():
    """The collector sees in-function and relative imports; the checks flag a bad toy graph."""
    source = (
        "import strlowrank.method.budget as b\n"
        "from . import cache\n"
        "from .rnn import RNNLayer\n"
        "def f():\n"
        "    from strlowrank.training import engine\n"
        "    from strlowrank import budget_table\n"
        "    import vision.models\n"
    )
    known = {
        "strlowrank",
        "strlowrank.method.budget",
        "strlowrank.method.cache",
        "strlowrank.method.rnn",
        "strlowrank.training.engine",
    }
    found = imports(ast.parse(source), "strlowrank.method.lowrank", False, known)
    assert found == [
        "strlowrank.method.budget",
        "strlowrank.method.cache",
        "strlowrank.method.rnn",
        "strlowrank.training.engine",
        "strlowrank",
        "vision.models",
    ]
    assert imports(ast.parse("from .training import engine"), "strlowrank", True, known) == [
        "strlowrank.training.engine"
    ]
    toy = {
        "strlowrank.method.lowrank": found,
        "strlowrank.method.rnn": ["strlowrank.method.lowrank"],
        "strlowrank.method.budget": [],
        "strlowrank.method.cache": [],
        "strlowrank.training.engine": [],
        "strlowrank": [],
    }
    assert layer_violations(toy) == [
        "strlowrank.method.lowrank (method) imports strlowrank.training.engine (training)",
        "strlowrank.method.lowrank (method) imports strlowrank (package)",
        "strlowrank.method.lowrank imports the track module vision.models",
    ]
    assert find_cycle(toy) == [
        "strlowrank.method.lowrank",
        "strlowrank.method.rnn",
        "strlowrank.method.lowrank",
    ]
    toy["strlowrank.method.rnn"] = []
    assert find_cycle(toy) is None
    assert group_of("strlowrank.new_module") is None


def test_core_names_no_track():
    found = [
        f"{path.relative_to(ROOT)}:{hit}"
        for path in sorted((ROOT / PACKAGE).rglob("*.py"))
        for hit in track_names(path.read_text())
    ]
    assert not found, (
        "the core names a track (reach it through strlowrank.analysis.tracks):\n" + "\n".join(found)
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
        "               or m.startswith(('strlowrank.export', 'strlowrank.analysis'))\n"
        "               for m in sys.modules)\n"
        "import strlowrank.training.engine, strlowrank.training.cli\n"
        "import strlowrank.method.budget, strlowrank.export\n"
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
