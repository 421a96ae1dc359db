"""Report over run folders: every applicable figure as PNG and a markdown summary table.

    python -m strlowrank.report RUN_DIR... --out DIR [--no-per-run]

RUN_DIR is a run folder or a folder searched for run folders (a sweep's output). Written:
    DIR/summary.md      a table of the runs (accuracy, sparsity, parameters, MACs, ranks) + figures
    DIR/runs.csv        the same runs, every summary field (``analysis.summaries``)
    DIR/<track>_budget.png, <track>_training.png            per track, runs side by side
    DIR/<track>_rank_accuracy.png                           runs whose models have ranks
    DIR/<track>_sparsity_accuracy.png, <track>_macs_accuracy.png    the other runs
    DIR/runs/<run>/{budget,training,thresholds,ranks,spectra}.png    single-run figures
    DIR/...             what the track's report module adds (``<track>.report.write``,
                        ``strlowrank.analysis.tracks``), e.g. a frontier of tagged runs
<track> is each run's summary.json 'track'. Figures that do not apply (no spectra without
low-rank matrices, no trade-off curve without accuracy) are skipped.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from strlowrank.analysis import Run, accuracy_column, budgets, load_runs, metrics, summaries
from strlowrank.analysis.plotting import (
    plot_layer_budget,
    plot_macs_accuracy,
    plot_rank_accuracy,
    plot_sparsity_accuracy,
    plot_sparsity_trajectory,
    run_figures,
    save_figure,
)
from strlowrank.analysis.tracks import report_part

MAX_BUDGET_RUNS = 6  # more runs than this on one per-layer figure: one run per method


def _budget_groups(budget: pd.DataFrame) -> list[pd.DataFrame]:
    """Split stacked budgets into groups of runs with the same layers (the same network)."""
    signature = budget.groupby("run", sort=False)["name"].agg(tuple)
    groups: dict[tuple, list[str]] = {}
    for run, names in signature.items():
        groups.setdefault(names, []).append(run)
    return [budget[budget["run"].isin(runs)] for runs in groups.values()]


def _representatives(budget: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """At most one run per method when there are many: the one nearest the median sparsity."""
    runs = list(dict.fromkeys(budget["run"]))
    if len(runs) <= MAX_BUDGET_RUNS:
        return budget
    rows = summary[summary["run"].isin(runs)].copy()
    rows["gap"] = (rows["sparsity"] - rows["sparsity"].median()).abs()
    keep = rows.sort_values("gap").drop_duplicates("method")["run"]
    return budget[budget["run"].isin(set(keep))]


def track_figures(track: str, runs: Sequence[Run]) -> dict[str, Figure]:
    """The comparison figures of the runs of one track, by file stem: per-layer budgets and
    training curves, and the trade-off the runs measure (accuracy against the total rank when
    their models have ranks, else against sparsity and MACs)."""
    name = track or "runs"  # the stem of runs that name no track (unfinished runs)
    figs: dict[str, Figure] = {}
    summary = summaries(runs)
    budget = budgets(runs)
    if budget is not None:
        groups = _budget_groups(budget)
        for i, group in enumerate(groups):
            suffix = f"_{i + 1}" if len(groups) > 1 else ""
            figs[f"{name}_budget{suffix}"] = plot_layer_budget(
                _representatives(group, summary), f"Per-layer budget ({name})"
            )
    table = metrics(runs)
    if table is not None:
        figs[f"{name}_training"] = plot_sparsity_trajectory(table, f"Training ({name})")
    if not summary["accuracy"].notna().any():
        return figs
    if summary["rank_total"].notna().any():
        figs[f"{name}_rank_accuracy"] = plot_rank_accuracy(summary)
    elif summary["sparsity"].notna().any():
        figs[f"{name}_sparsity_accuracy"] = plot_sparsity_accuracy(summary)
        if "macs_sparse" in summary and summary["macs_sparse"].notna().any():
            figs[f"{name}_macs_accuracy"] = plot_macs_accuracy(summary)
    return figs


def format_cell(value: object, fmt: str) -> str:
    """A table cell: ``value`` formatted with ``fmt`` (as it is when ``fmt`` is ''), '' when
    it is missing (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, fmt) if fmt else str(value)


def summary_markdown(summary: pd.DataFrame) -> str:
    """A markdown table of the runs: accuracy and sparsity in %, parameters in K, MACs in M."""
    acc = accuracy_column(summary)
    rank_cols = [c for c in summary.columns if c.startswith("ranks.")]
    cols = [  # (header, column, format, scale)
        ("run", "run", "", 1),
        ("track", "track", "", 1),
        ("method", "method", "", 1),
        ("epochs", "epochs", "", 1),
        (f"{acc} %", acc, ".2f", 100),
        ("sparsity %", "sparsity", ".2f", 100),
        ("nnz (K)", "nnz", ".1f", 1e-3),
        ("params (K)", "params", ".1f", 1e-3),
        ("MACs (M)", "macs_sparse", ".2f", 1e-6),
        ("ranks", "ranks", "", 1),
        ("time (s)", "train_time_s", ".0f", 1),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in summary.iterrows():
        cells = []
        for _, col, fmt, scale in cols:
            if col == "ranks":
                ranks = [int(row[c]) for c in rank_cols if pd.notna(row[c])]
                cells.append("/".join(map(str, ranks)))
                continue
            value = row.get(col)
            if fmt and value is not None and pd.notna(value):
                value = float(value) * scale
            cells.append(format_cell(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[Run], out: str | Path, per_run: bool = True) -> list[Path]:
    """Write every applicable figure, runs.csv and summary.md into ``out``; return the PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tracks = sorted({r.track for r in runs}, key=lambda t: (t == "", t))
    for track in tracks:
        selected = [r for r in runs if r.track == track]
        for stem, fig in track_figures(track, selected).items():
            written.append(save_figure(fig, out / f"{stem}.png"))
    if per_run:
        for run in runs:
            folder = out / "runs" / run.label.replace("/", "__")
            for stem, fig in run_figures(run).items():
                written.append(save_figure(fig, folder / f"{stem}.png"))
    summary = summaries(runs)
    summary.to_csv(out / "runs.csv", index=False)
    for track in tracks:
        part = report_part(track)
        if part is not None:
            written += part.write(summary[summary["track"] == track], out)
    links = "\n".join(f"- [{p.relative_to(out)}]({p.relative_to(out)})" for p in written)
    (out / "summary.md").write_text(
        f"# Runs\n\n{summary_markdown(summary)}\n## Figures\n\n{links}\n"
    )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m strlowrank.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders, or folders searched for run folders",
    )
    parser.add_argument("--out", required=True, help="report folder (PNGs, summary.md)")
    parser.add_argument(
        "--no-per-run", action="store_true", help="only the comparison figures, not each run's own"
    )
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(
            f"error: no run folders (with summary.json) under {' '.join(args.runs)}",
            file=sys.stderr,
        )
        return 2
    written = write_report(runs, args.out, per_run=not args.no_per_run)
    print(f"report: {len(runs)} run(s), {len(written)} figure(s)")
    print(f"summary table: {Path(args.out) / 'summary.md'}")
    print(f"figures: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
