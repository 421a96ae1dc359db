"""Load run folders into pandas tables: the input of every plot, report, sweep and notebook.

A run folder (written by the engine and the entry scripts) holds config.yaml, metrics.csv (a row
per epoch), budget.csv (the final per-layer table, last row 'total'), budget_history.csv (per-layer
rows per epoch), summary.json and, for models with low-rank matrices, spectra.csv (singular values
at init and at the end, with the threshold in sigma units). Every file is optional here; a
missing table is ``None``.

    runs = load_runs(["runs/demo"])        # folders, or parents searched for summary.json
    summaries(runs)     one row per run: run, track, method, group, accuracy, sparsity, ...
    metrics(runs)       metrics.csv of every run, with run / track / method columns
    budgets(runs)       budget.csv layer rows (no 'total'), with a network-order 'order' column
    histories(runs)     budget_history.csv rows;  spectra(runs)  spectra.csv rows
    aggregate(table, by, value)     mean, sd, n, 95% t-interval over the seeds of each point

A track's own tables over these (e.g. a frontier of methods and budgets) live in the track.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from scipy import stats

from strlowrank.method.budget import layers

RUN_MARKERS = ("summary.json", "metrics.csv", "budget.csv")
SUMMARY_COLUMNS = ("epochs", "val_acc", "test_acc", "sparsity", "nnz", "macs_sparse")


@dataclass
class Run:
    """The tables of one run folder; ``label`` is unique among the runs loaded together."""

    path: Path
    label: str
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    metrics: pd.DataFrame | None = None
    budget: pd.DataFrame | None = None
    history: pd.DataFrame | None = None
    spectra: pd.DataFrame | None = None

    @property
    def track(self) -> str:
        """The track that wrote the run: summary.json's 'track' (every entry point writes it);
        '' when the run has none (an unfinished run)."""
        return str(self.summary.get("track") or "")

    @property
    def method(self) -> str:
        """summary.json 'method', else the config's, else guessed from the budget's 'param'
        ('full' for a model with low-rank matrices at full rank, 'dense' for any other)."""
        if self.summary.get("method"):
            return str(self.summary["method"])
        section = self.config.get("method")
        if isinstance(section, dict) and section.get("name"):
            return str(section["name"])
        params = set() if self.budget is None else set(self.budget["param"].dropna())
        for param, method in (("str", "str"), ("mask", "gmp"), ("lowrank", "lowrank")):
            if param in params:
                return method
        ranks = None if self.budget is None else self.budget.get("rank")
        ranked = ranks is not None and bool(ranks.notna().any())
        return "full" if ranked or self.spectra is not None else "dense"


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in RUN_MARKERS)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder or is searched for run folders
    (any depth, by their summary.json). Order: as given, then sorted; duplicates dropped."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run folder: {p}")
        if is_run_dir(p):
            candidates = [p]
        else:
            candidates = sorted(s.parent for s in p.rglob("summary.json"))
        found += [c for c in candidates if c not in found]
    return found


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read every table of one run folder (missing files give ``None`` / ``{}``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such run folder: {path}")
    config = {}
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    summary = {}
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    return Run(
        path=path,
        label=label or path.name,
        config=config,
        summary=summary,
        metrics=_read_csv(path / "metrics.csv"),
        budget=_read_csv(path / "budget.csv"),
        history=_read_csv(path / "budget_history.csv"),
        spectra=_read_csv(path / "spectra.csv"),
    )


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest path suffixes (folder name, then parent/name, ...) that tell runs apart."""
    depth = 1
    while True:
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth > 8:
            return labels
        depth += 1


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load every run folder found under ``paths`` (see :func:`find_runs`)."""
    dirs = find_runs(paths)
    return [load_run(d, label) for d, label in zip(dirs, _unique_labels(dirs))]


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{'ranks': {'rnn.0.W': 8}} -> {'ranks.rnn.0.W': 8}; lists become strings."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, prefix=f"{name}.")
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def config_group(config: dict, ignore: Sequence[str] = ("out", "train.seed", "data.root")) -> str:
    """A short hash of the config without seed and paths: runs that differ only by seed share it."""
    flat = {k: v for k, v in flatten(config).items() if k not in ignore}
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def accuracy_column(table: pd.DataFrame) -> str:
    """'test_acc' when every run has it, else 'val_acc'."""
    if "test_acc" in table and table["test_acc"].notna().all():
        return "test_acc"
    return "val_acc"


def _rank_total(run: Run) -> float:
    """Sum of the ranks of the low-rank matrices (summary 'ranks', else budget.csv)."""
    ranks = run.summary.get("ranks")
    if isinstance(ranks, dict) and ranks:
        return float(sum(ranks.values()))
    if run.budget is not None and "rank" in run.budget:
        rank = layers(run.budget)["rank"]
        return float(rank.sum()) if rank.notna().any() else float("nan")
    return float("nan")


def summaries(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: run, path, track, method, group, seed, rank_total, every summary field
    (nested ones flattened, e.g. ``ranks.rnn.0.W``) and 'accuracy' (test_acc, else val_acc)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run": run.label,
            "path": str(run.path),
            "track": run.track,
            "method": run.method,
            "group": config_group(run.config),
            "seed": run.config.get("train", {}).get("seed"),
        }
        row |= flatten({k: v for k, v in _summary(run).items() if k not in ("track", "method")})
        row["rank_total"] = _rank_total(run)
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in SUMMARY_COLUMNS:
        if column not in table:
            table[column] = float("nan")
    table["accuracy"] = table["test_acc"].fillna(table["val_acc"])
    return table


def _summary(run: Run) -> dict[str, Any]:
    """summary.json, or for an unfinished run the last metrics.csv row (marked finished=False)."""
    if run.summary or run.metrics is None or not len(run.metrics):
        return run.summary
    last = run.metrics.iloc[-1]
    keys = ("val_acc", "val_top5", "val_loss", "sparsity", "nnz", "macs_sparse")
    return {
        "epochs": int(last["epoch"]),
        "finished": False,
        **{k: float(last[k]) for k in keys if k in last},
    }


def _stack(runs: Sequence[Run], attr: str) -> pd.DataFrame | None:
    parts = []
    for run in runs:
        table = getattr(run, attr)
        if table is not None and len(table):
            parts.append(table.assign(run=run.label, track=run.track, method=run.method))
    return pd.concat(parts, ignore_index=True) if parts else None


def metrics(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Every run's metrics.csv stacked, with run / track / method columns (None if none)."""
    return _stack(runs, "metrics")


def budgets(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Every run's budget.csv layer rows (no 'total') with an 'order' column (network order)."""
    parts = []
    for run in runs:
        if run.budget is None:
            continue
        table = layers(run.budget).reset_index(drop=True)
        parts.append(
            table.assign(order=range(len(table)), run=run.label, track=run.track, method=run.method)
        )
    return pd.concat(parts, ignore_index=True) if parts else None


def histories(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Every run's budget_history.csv stacked (epoch, name, nnz, sparsity, threshold, rank)."""
    return _stack(runs, "history")


def spectra(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Every run's spectra.csv stacked (layer, matrix, stage, index, sigma, threshold)."""
    return _stack(runs, "spectra")


def layer_order(budget: pd.DataFrame) -> list[str]:
    """Layer names in network order over several stacked runs (first appearance wins)."""
    return list(dict.fromkeys(budget["name"]))


def aggregate(
    table: pd.DataFrame,
    by: Sequence[str],
    value: str,
    level: float = 0.95,
    extra: Sequence[str] = (),
) -> pd.DataFrame:
    """Mean, sd, n and a Student-t interval of ``value`` over the rows of each group of ``by``
    (the seeds of one sweep point):

        mean +- t_{(1 + level) / 2, n - 1} sd / sqrt(n),     sd with n - 1 degrees of freedom

    Columns: *by, n, mean, sd, ci (the half width), lo, hi, then the mean of every ``extra``
    column. Rows whose ``value`` is missing are left out; a group of one value has sd, ci, lo
    and hi NaN. Groups keep their first-appearance order; missing keys form their own group.
    """
    rows = []
    for key, group in table.groupby(list(by), sort=False, dropna=False):
        values = pd.to_numeric(group[value], errors="coerce").dropna()
        n = len(values)
        mean = float(values.mean()) if n else math.nan
        sd = float(values.std(ddof=1)) if n > 1 else math.nan
        ci = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan
        keys = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, keys)) | {
            "n": n,
            "mean": mean,
            "sd": sd,
            "ci": ci,
            "lo": mean - ci,
            "hi": mean + ci,
        }
        row |= {c: float(pd.to_numeric(group[c], errors="coerce").mean()) for c in extra}
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "sd", "ci", "lo", "hi", *extra])
