"""Sweeps: a grid of configs for a track, one run folder each, and one results.csv.

    python -m strlowrank.sweep --track TRACK --grid GRID.yaml \\
        --out runs/rank [--seeds 0 1] [--dry-run] [--command "python my_trainer.py"] [--jobs 4] \\
        [--launcher submitit --partition gpu --gpus-per-node 8]

The grid file (YAML) has any of
    base: {epochs: 10, train.lr: 0.01}          arguments common to all runs
    grid: {train.threshold_decay: [1e-4, 3e-4]}  dotted key -> values; the cartesian product
    runs: [{model.param: full}, {model.param: lowrank, model.rank_u: 8}]  explicit override sets
(runs x grid x seeds when several are given). Each run is ``<command> --out DIR/<name> --key
value ...`` in a subprocess (by default the file of the track's entry point,
`strlowrank.analysis.tracks.entry_script`: TRACK names a top-level package), its output in
DIR/<name>/train.log; <name> comes from the run's own overrides (base left out), so it is stable.
A run whose summary.json exists is skipped, one with only a checkpoint.pt is resumed: restarting
the sweep finishes what is missing. DIR/results.csv gets one row per run (overrides + summary, and
'point': the run's name without its seed), in grid order, rewritten atomically as runs finish;
DIR/points.csv the mean, sd, n and 95% t-interval of the accuracy over the seeds of each point
(``analysis.aggregate``).
``--only REGEX`` starts only the runs whose name matches (one grid run in parts into one folder).

Runs go one after another by default; ``--jobs N`` runs N at once on this machine and divides
its CPU threads between them (``--threads`` per run). ``--launcher submitit`` hands each run to
Slurm as one job (same grid file, same run folders; torchrun inside the job when it has more
than one GPU); ``--cluster local`` or ``debug`` runs those jobs on this machine instead.
The launchers are in `strlowrank.analysis.launch`.

A string value may name ``{sweep}`` (the sweep folder DIR) and ``{seed}`` (the run's seed), e.g.
``model.init_from: "{sweep}/param=full__seed={seed}/checkpoint.pt"`` starts each seed's run from
that seed's full-rank run; such a reference must name an earlier run of the same sweep.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm import tqdm

from strlowrank.analysis import accuracy_column, aggregate, flatten, load_run
from strlowrank.analysis.launch import CLUSTERS, ClusterConfig, Launch, run_local, run_submitit
from strlowrank.analysis.tracks import entry_script
from strlowrank.method.cache import write_atomic

MAX_NAME = 100
RUN_REFERENCE = re.compile(r"\{sweep\}/([^/]+)/")


@dataclass
class SweepRun:
    """One point of the sweep: its folder name and its overrides (base not included)."""

    name: str
    overrides: dict[str, Any]


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read and check a grid file: a mapping with base / grid / runs (all optional). Errors are
    one-line ValueErrors that name the file (and the line, for YAML syntax)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the grid file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict) or set(data) - {"base", "grid", "runs"}:
        raise ValueError(f"{path}: expected a mapping with keys base, grid, runs")
    if not isinstance(data.get("base") or {}, dict) or not isinstance(data.get("grid") or {}, dict):
        raise ValueError(f"{path}: base and grid must be mappings")
    for key, values in (data.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list of values")
    runs = data.get("runs") or []
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError(f"{path}: runs must be a list of mappings")
    return data


def format_value(value: Any) -> str:
    """A command-line value the entry scripts parse back to ``value`` (YAML syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True).strip()


def run_name(overrides: dict[str, Any]) -> str:
    """A stable, filesystem-safe folder name: 'key=value' pairs (last part of dotted keys when
    unambiguous) joined by '__', e.g. 'threshold_decay=0.0001__seed=0'; a path value keeps its
    last two parts; long names are shortened with a hash of the full overrides."""
    if not overrides:
        return "base"
    leaves = [k.rsplit(".", 1)[-1] for k in overrides]
    parts = []
    for key, leaf in zip(overrides, leaves):
        label = leaf if leaves.count(leaf) == 1 else key
        value = format_value(overrides[key])
        if isinstance(overrides[key], str) and value.count("/") > 1:  # a path: its last two parts
            value = "/".join(value.rstrip("/").split("/")[-2:])
        parts.append(f"{label}={value}")
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "__".join(parts)).strip("-.")
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(repr(sorted(overrides.items())).encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


def expand(spec: dict[str, Any], seeds: Sequence[int] | None = None) -> list[SweepRun]:
    """The runs of a grid spec: each explicit run x the grid's product x the seeds."""
    grid = spec.get("grid") or {}
    explicit = spec.get("runs") or [{}]
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    runs = []
    for extra in explicit:
        for point in points:
            for seed in seeds if seeds else [None]:
                overrides = {**extra, **point} | ({"seed": seed} if seed is not None else {})
                runs.append(SweepRun(run_name(overrides), overrides))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the sweep has identical runs: {', '.join(duplicates)}")
    for i, run in enumerate(runs):  # {sweep}/<run>/... must point back to an earlier run
        for value in run.overrides.values():
            for ref in RUN_REFERENCE.findall(str(value)):
                if "{seed}" in ref and "seed" not in run.overrides:
                    continue  # no seed to resolve it: command_line refuses the run
                ref = ref.replace("{seed}", str(run.overrides.get("seed")))
                if ref not in names[:i]:
                    raise ValueError(
                        f"run {run.name} refers to {{sweep}}/{ref}, which is not "
                        "an earlier run of this sweep"
                    )
    return runs


def default_command(track: str) -> list[str]:
    """[python, <the file of the track's entry point>]
    (``strlowrank.analysis.tracks.entry_script``)."""
    return [sys.executable, str(entry_script(track))]


def command_line(command: Sequence[str], out: Path, args: dict[str, Any]) -> list[str]:
    """``command --out DIR --key value ...`` (a checkpoint.pt in DIR adds --resume); ``{sweep}``
    and ``{seed}`` in string values become the sweep folder (DIR's parent) and the run's seed."""
    line = [*command, "--out", str(out)]
    for key, value in args.items():
        if isinstance(value, str) and "{seed}" in value and "seed" not in args:
            raise ValueError(f"{key}: {{seed}} needs a seed (--seeds or a seed override)")
        if isinstance(value, str):
            value = value.replace("{sweep}", str(out.parent))
            value = value.replace("{seed}", str(args.get("seed")))
        line += [f"--{key}", format_value(value)]
    if (out / "checkpoint.pt").is_file():
        line += ["--resume", str(out / "checkpoint.pt")]
    return line


def result_row(run: SweepRun, folder: Path, status: str) -> dict[str, Any]:
    """One results.csv row: run name, folder, status, overrides, flattened summary.json."""
    row: dict[str, Any] = {"run": run.name, "path": str(folder), "status": status}
    row["point"] = run_name({k: v for k, v in run.overrides.items() if k != "seed"})
    row |= run.overrides
    if (folder / "summary.json").is_file():
        loaded = load_run(folder)
        row |= {"track": loaded.track, "method": loaded.method} | flatten(loaded.summary)
    return row


def _tail(path: Path, n: int = 5) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in lines[-n:])


def _plan(
    runs: Sequence[SweepRun],
    out: Path,
    command: Sequence[str],
    base: dict[str, Any],
    dry_run: bool,
    only: Sequence[str],
) -> tuple[dict[str, dict[str, Any]], list[Launch]]:
    """Result rows of the runs that will not start (done, not selected, dry run: printed) and
    the launches of the others."""
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for run in runs:
        folder = out / run.name
        line = command_line(command, folder, {**base, **run.overrides})
        if (folder / "summary.json").is_file():
            rows[run.name] = result_row(run, folder, "done")
        elif only and not any(re.search(pattern, run.name) for pattern in only):
            rows[run.name] = result_row(run, folder, "not selected")
        elif dry_run:
            print(shlex.join(line))
            rows[run.name] = result_row(run, folder, "pending")
        else:
            todo.append(Launch(run.name, line, folder, _references(run)))
    return rows, todo


def _references(run: SweepRun) -> tuple[str, ...]:
    """The runs of the sweep that ``run``'s values name as ``{sweep}/<run>/...``."""
    seed = str(run.overrides.get("seed"))
    return tuple(
        ref.replace("{seed}", seed)
        for value in run.overrides.values()
        for ref in RUN_REFERENCE.findall(str(value))
    )


def run_sweep(
    runs: Sequence[SweepRun],
    out: str | Path,
    command: Sequence[str],
    base: dict[str, Any] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
    cluster: ClusterConfig | None = None,
    only: Sequence[str] = (),
) -> pd.DataFrame:
    """Run every missing run (skip those with summary.json); write and return results.csv.

    ``only``: regular expressions; a missing run whose name matches none of them is not started
    (its row says 'not selected'), so one grid can be run in parts into one folder and
    results.csv always covers the whole grid. ``jobs`` runs at once on this machine with
    ``threads`` CPU threads each (default: the CPUs divided between the jobs), or, with
    ``cluster``, one submitit job per run. results.csv (rows in grid order) is rewritten
    atomically by this process as each run finishes."""
    out = Path(out)
    rows, todo = _plan(runs, out, command, base or {}, dry_run, only)
    by_name = {run.name: run for run in runs}

    def ordered() -> list[dict[str, Any]]:
        return [rows[r.name] for r in runs if r.name in rows]

    if not dry_run:
        _write_results(ordered(), out)
    if cluster is not None and todo:
        (out / ".submitit").mkdir(parents=True, exist_ok=True)
        finished = run_submitit(todo, out / ".submitit", cluster)
    else:
        finished = run_local(todo, jobs, threads)
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress or not todo)
    for name, code in finished:
        folder = out / name
        done = code == 0 and (folder / "summary.json").is_file()
        status = "ok" if done else f"failed ({code})"
        if status != "ok":
            tqdm.write(
                f"{name}: {status}, see {folder / 'train.log'}\n{_tail(folder / 'train.log')}"
            )
        rows[name] = result_row(by_name[name], folder, status)
        _write_results(ordered(), out)
        bar.update(1)
    bar.close()
    return pd.DataFrame(ordered())


def _write_results(rows: list[dict], out: Path) -> None:
    write_atomic(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))


def _cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """The --cluster ... --slurm-arg flags as a ClusterConfig (KEY=VALUE checked)."""
    extra = {}
    for item in args.slurm_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-arg {item!r}: expected KEY=VALUE")
        extra[key] = value
    return ClusterConfig(
        cluster=args.cluster,
        partition=args.partition,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout_min,
        slurm_args=extra,
    )


def write_points(table: pd.DataFrame, out: Path) -> Path | None:
    """DIR/points.csv: accuracy mean, sd, n, 95% interval over the seeds of each point."""
    done = table[table["status"].isin(["ok", "done"])]
    if not len(done) or not {"test_acc", "val_acc"} & set(done):
        return None
    column = accuracy_column(done)
    extra = [c for c in ("params", "nnz", "sparsity", "cost_epochs") if c in done]
    points = aggregate(done, ["point"], column, extra=extra)
    points.to_csv(out / "points.csv", index=False)
    print(f"points: {out / 'points.csv'} ({column} over seeds)")
    return out / "points.csv"


def _check_pattern(pattern: str) -> None:
    """A bad ``--only`` regular expression as a ValueError that names the flag."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--only {pattern!r}: not a regular expression ({e})") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m strlowrank.sweep`` (the module docstring is its help)."""
    parser = argparse.ArgumentParser(
        prog="python -m strlowrank.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--track", help="the track (a top-level package) whose entry point runs")
    parser.add_argument("--grid", required=True, help="grid YAML (base / grid / runs)")
    parser.add_argument("--out", required=True, help="sweep folder: one run folder per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="run every point with these seeds")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="REGEX",
        help="start only the runs whose folder name matches (repeatable: any "
        "of them); results.csv still lists the whole grid",
    )
    parser.add_argument("--command", help="trainer command instead of the track's entry script")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on this machine")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per run (default: the CPUs divided by --jobs, at most $OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        default="local",
        help="local processes, or one submitit job per run",
    )
    job = parser.add_argument_group("submitit jobs (--launcher submitit)")
    job.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="slurm",
        help="slurm, or submitit's local / debug executors on this machine",
    )
    job.add_argument("--partition", help="Slurm partition")
    job.add_argument("--nodes", type=int, default=1, help="nodes per run (torchrun across them)")
    job.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per node; more than one GPU per run starts it under torchrun",
    )
    job.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per node")
    job.add_argument("--mem-gb", type=float, help="memory per node")
    job.add_argument("--timeout-min", type=int, default=60 * 24, help="time limit per run")
    job.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, e.g. account=proj (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.track and not args.command:
        parser.error("give --track TRACK (or --command)")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    try:
        spec = load_grid(args.grid)
        runs = expand(spec, args.seeds)
        for pattern in args.only:
            _check_pattern(pattern)
        command = shlex.split(args.command) if args.command else default_command(args.track)
        cluster = _cluster_config(args) if args.launcher == "submitit" else None
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = {"track": args.track, "command": command, "seeds": args.seeds, **spec}
        write_atomic(Path(args.out) / "sweep.yaml", yaml.safe_dump(record, sort_keys=False))
    table = run_sweep(
        runs,
        args.out,
        command,
        spec.get("base"),
        args.dry_run,
        jobs=args.jobs,
        threads=args.threads,
        cluster=cluster,
        only=args.only,
    )
    failed = table[table["status"].str.startswith("failed")]
    unselected = int((table["status"] == "not selected").sum())
    print(
        f"sweep: {len(table)} run(s), {int((table['status'] == 'done').sum())} skipped "
        f"(done before), {len(failed)} failed"
        + (f", {unselected} not selected (--only)" if unselected else "")
    )
    if not args.dry_run:
        print(f"results: {Path(args.out) / 'results.csv'}")
        write_points(table, Path(args.out))
        print(f"report: python -m strlowrank.report {args.out} --out {Path(args.out) / 'report'}")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
