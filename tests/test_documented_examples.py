"""Every shipped and documented example is valid: configs/*.yaml (through the track's loader,
sweep grids through strlowrank.analysis.sweep's), every dotted override (``--section.key value`` or
``section.key: value``) in README.md, docs/*.md and the packages' module docstrings, and every
``configs/...`` and ``docs/...`` path cited anywhere in the repository."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from speech.config import SpeechConfig
from strlowrank.analysis.sweep import expand, load_grid
from strlowrank.training.cli import SHORTCUTS
from strlowrank.training.config import ConfigError, load_config, parse_value
from strlowrank.training.engine import role_lrs
from vision.config import VisionConfig

ROOT = Path(__file__).resolve().parents[1]
TRACKS = {"speech": SpeechConfig, "vision": VisionConfig}

# --section.key VALUE or --section.key=VALUE (a quoted value may hold spaces)
CLI = re.compile(r"""(?<![\w-])--([a-z_]+(?:\.[a-z_]+)+)(?:=|[ ]+)('[^']*'|"[^"]*"|[^\s`'"|),]+)""")
# section.key: VALUE as in a sweep grid; a value followed by more words is prose (an error message)
PAIR = re.compile(
    r"""(?<![\w./-])([a-z_]+(?:\.[a-z_]+)+):[ ]+"""
    r"""("[^"]*"|'[^']*'|\[[^\]]*\]|\{[^}]*\}|[^\s,}\]`]+)(?=$|[,}\]`]|[ ]{2,}|[ ]*#)""",
    re.MULTILINE,
)
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "csv", "json", "txt", "pt", "png", "ipynb"}

# documented failures (docs/RELIABILITY.md): these overrides must fail with this message
DOCUMENTED_ERRORS = [
    ({"model.hidden": 0}, "model.hidden: must be >= 1"),
    ({"model.hidden": -3}, "model.hidden: must be >= 1"),
    ({"model.layers": 0}, "model.layers: must be >= 1"),
]


def documents() -> list[tuple[str, str]]:
    """(source, text) of README.md, docs/*.md and the module docstrings of the three packages."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out = [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in paths]
    for package in ("strlowrank", "vision", "speech"):
        for path in sorted((ROOT / package).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if doc:
                out.append((path.relative_to(ROOT).as_posix(), doc))
    return out


def track_of(source: str, line: str) -> str | None:
    """The track an example is for: the entry script on its line, else its module's package."""
    for name, script in (("speech", "speech/train_gru.py"), ("vision", "vision/train.py")):
        if script in line:
            return name
    return next((name for name in TRACKS if source.startswith(f"{name}/")), None)


def command_lines(text: str) -> list[str]:
    """Lines of ``text`` with backslash continuations joined, and inline code spans that wrap
    over a line break of the prose kept on one line (fenced blocks keep their lines)."""
    lines = []
    for i, part in enumerate(re.split(r"(```.*?```)", text, flags=re.DOTALL)):
        if i % 2 == 0:  # prose: `a span\nthat wraps` is one command
            part = re.sub(r"`[^`]+`", lambda m: m.group(0).replace("\n", " "), part)
        lines += re.sub(r"\\\n\s*", " ", part).splitlines()
    return lines


def cli_examples(source: str, text: str) -> list[tuple[str, str | None, dict]]:
    """(source, track, overrides) per command line; an upper-case value is a placeholder (VALUE)."""
    out = []
    for line in command_lines(text):
        found = {
            key: parse_value(value.strip("'\""))
            for key, value in CLI.findall(line)
            if not re.fullmatch(r"[A-Z_]+", value)
        }
        if found:
            out.append((source, track_of(source, line), found))
    return out


def pair_examples(source: str, text: str) -> list[tuple[str, str | None, dict]]:
    """(source, track, {key: value}) per ``section.key: value`` pair (file names left out)."""
    out = []
    for key, value in PAIR.findall(text):
        if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            out.append((source, track_of(source, ""), {key: yaml.safe_load(value)}))
    return out


def check(overrides: dict, track: str | None) -> str | None:
    """None when ``overrides`` load in ``track``'s config (either track when None), else the
    errors. A list for a scalar field is a sweep grid's values: each value is checked."""
    errors = []
    for name in [track] if track else list(TRACKS):
        try:
            load_config(TRACKS[name], None, overrides)
            return None
        except ConfigError as e:
            if len(overrides) == 1 and isinstance(next(iter(overrides.values())), list):
                ((key, values),) = overrides.items()
                if all(check({key: v}, name) is None for v in values):
                    return None
            errors.append(f"{name}: {e}")
    return "; ".join(errors)


def all_examples() -> list[tuple[str, str | None, dict]]:
    return [
        ex
        for source, text in documents()
        for ex in cli_examples(source, text) + pair_examples(source, text)
    ]


def test_examples_are_found():
    examples = all_examples()
    sources = {source for source, _, _ in examples}
    assert len(examples) > 40
    assert {
        "README.md",
        "docs/ANALYSIS.md",
        "strlowrank/analysis/sweep.py",
        "speech/train_gru.py",
    } <= sources
    # the extractor sees quoted YAML values, grid lists and continued command lines
    assert (
        "docs/LEARNED_RANK.md",
        "speech",
        {"model.param": "lowrank", "model.rank_w": 7, "model.rank_u": 14},
    ) in examples
    assert ("docs/METHOD.md", None, {"train.role_lr_per_run": {"threshold": None}}) in examples
    assert (
        "strlowrank/analysis/sweep.py",
        None,
        {"train.threshold_decay": ["1e-4", "3e-4"]},
    ) in examples
    # and it would catch a stale one
    assert "unknown config key 'model.rank'" in check({"model.rank": 8}, None)
    assert "must be one of" in check({"model.cell": "rnn"}, "speech")


def test_every_documented_override_is_valid():
    stale, unseen = [], list(DOCUMENTED_ERRORS)
    for source, track, overrides in all_examples():
        message = next((m for o, m in DOCUMENTED_ERRORS if o == overrides), None)
        if message is not None:
            unseen = [(o, m) for o, m in unseen if o != overrides]
            with pytest.raises(ConfigError, match=re.escape(message)):
                load_config(TRACKS[track or "speech"], None, overrides)
            continue
        error = check(overrides, track)
        if error:
            stale.append(f"{source}: {overrides}: {error}")
    assert not stale, "\n".join(stale)
    assert not unseen, f"documented errors no longer in the docs: {unseen}"


def test_documented_sweep_grid_is_valid():
    """The grid file of docs/ANALYSIS.md, expanded as strlowrank.analysis.sweep does, run by run."""
    text = (ROOT / "docs" / "ANALYSIS.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert blocks
    for block in blocks:
        spec = yaml.safe_load(block)
        runs = expand(spec)
        assert len(runs) >= 2
        for run in runs:
            args = {**(spec.get("base") or {}), **run.overrides}
            load_config(SpeechConfig, None, {SHORTCUTS.get(k, k): v for k, v in args.items()})


def test_shipped_configs_load():
    """Every YAML in configs/ is valid for its track (paper recipes keep their exact numbers)."""
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        if path.name.startswith("sweep_"):  # sweep grids: every run's overrides are valid
            spec = load_grid(path)
            cls = SpeechConfig if "speech" in path.name else VisionConfig
            for run in expand(spec):  # sweep arguments may use the CLI shortcuts (epochs, seed)
                args = {**spec["base"], **run.overrides}
                base = args.pop("config", None)  # --config FILE, relative to the repository
                base = ROOT / base if base else None
                load_config(cls, base, {SHORTCUTS.get(k, k): v for k, v in args.items()})
            if path.name == "sweep_speech_frontier.yaml":  # {sweep}/<run> references resolve
                assert len(expand(spec, [0, 1, 2])) == 3 * 41
            continue
        cls = VisionConfig if path.name.startswith("vision_") else SpeechConfig
        cfg = load_config(cls, path)
        if path.name == "vision_resnet50_str90.yaml":
            assert cfg.method.s_init == -3200 and cfg.train.weight_decay == 2.251757813e-5
            assert cfg.train.lr == 0.256 and cfg.train.momentum == 0.875
            assert cfg.train.channels_last == "on"  # the YAML's true
        if path.name in ("vision_resnet50_str90.yaml", "vision_mobilenetv1_str89.yaml"):
            # thresholds on the run's clock: the paper's per-step lr at the paper's length
            assert role_lrs(cfg.train, 5005 * 100)["threshold"] == pytest.approx(0.256)
        if "x2" in path.name or "pergate" in path.name:  # two layers / one matrix per gate
            assert cfg.model.layers == (2 if "x2" in path.name else 1)
            assert cfg.model.split == ("per_gate" if "pergate" in path.name else "stacked")
        if path.name == "vision_mobilenetv1_str89.yaml":
            assert cfg.method.s_init == -12800 and cfg.train.threshold_decay == 3.751757813e-5


# configs/... or docs/... as cited in text (a glob such as configs/vision_*.yaml must match)
CITED = re.compile(r"(?<![\w./-])((?:configs|docs)/[\w.*/-]*[\w*])")
TEXT_FILES = (
    "README.md",
    "Makefile",
    "pyproject.toml",
    "configs/*.yaml",
    "docs/**/*.md",
    "docs/**/*.py",
    "strlowrank/**/*.py",
    "vision/*.py",
    "speech/*.py",
    "bench/*.py",
    "tests/*.py",
    "notebooks/*.ipynb",
)


# any relative path to a file (folder/.../name.suffix); it must exist from the repository root or
# from the citing file's folder, unless it is a placeholder (DIR/points.csv) or a run's output
FILE_PATH = re.compile(
    r"(?<![\w./~$-])((?:[\w.-]+/)+[\w*-][\w.*-]*\.(?:py|md|yaml|yml|ipynb|sh|cpp|toml|txt|json|csv))\b"
)
GENERATED = ("runs/", "bench/out/")
PACKAGES = ("strlowrank", "vision", "speech")


def test_every_cited_path_exists():
    files = sorted({p for pattern in TEXT_FILES for p in ROOT.glob(pattern)})
    missing, seen = [], 0
    for path in files:
        text = path.read_text()
        for cited in CITED.findall(text):
            seen += 1
            if not any(ROOT.glob(cited)):
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
        for cited in FILE_PATH.findall(text):
            if cited.startswith(GENERATED) or re.match(r"[A-Z_]+/", cited):
                continue
            seen += 1
            # from the root, from the citing file, or package data (pyproject.toml's
            # export/csrc/*.cpp)
            bases = (ROOT, path.parent, *(ROOT / name for name in PACKAGES))
            if not any(any(base.glob(cited)) for base in bases):
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert seen > 100
    assert not missing, "\n".join(missing)


def test_the_path_check_catches_a_file_outside_the_repository():
    outside = "/".join(["scratch", "tuning", "train.py"])  # joined: this file cites no such path
    assert FILE_PATH.findall(f"tuned with `{outside}`, see docs/METHOD.md") == [
        outside,
        "docs/METHOD.md",
    ]
    assert not any(ROOT.glob(outside))


# words that tell a reader about the project's issue tracker or its history of work, not the project
NOT_PROJECT_LANGUAGE = re.compile(
    r"PAPER[.]md|issue\s#?\d|\bthis\ssession|\bhelpers?\sthat\sbuilt|\btree\s[A-Z]\b"
    r"|\bv1\sdata\b|\bruns?\s[A-K]\b|\bfirst\sversion\b|\bbefore\sthe\sfix\b|\bthe\sacceptance\b"
)


def test_documents_speak_of_the_project_only():
    """README, docs and code cite docs/ or the paper, never a tracker issue or work history."""
    files = sorted({p for pattern in TEXT_FILES for p in ROOT.glob(pattern)})
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in files
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if NOT_PROJECT_LANGUAGE.search(line)
    ]
    assert not found, "\n".join(found)
    # and it would catch one (joined, so that this file holds no such phrase itself)
    assert NOT_PROJECT_LANGUAGE.search(" ".join(["measured for issue", "#12"]))
    assert NOT_PROJECT_LANGUAGE.search(" ".join(["on tree", "B", "of the data"]))
