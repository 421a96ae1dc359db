"""Report over run folders: every applicable figure as PNG and a markdown summary table.

    python -m strlowrank.report RUN_DIR... --out DIR [--no-per-run]

RUN_DIR is a run folder or a folder searched for run folders (a sweep's output). Written:
    DIR/summary.md      a table of the runs (accuracy, sparsity, parameters, MACs, ranks) + figures
    DIR/runs.csv        the same runs, every summary field (``analysis.summaries``)
    DIR/<track>_budget.png, <track>_training.png            per track, runs side by side
    DIR/vision_sparsity_accuracy.png, vision_macs_accuracy.png, speech_rank_accuracy.png
    DIR/runs/<run>/{budget,training,thresholds,ranks,spectra}.png    single-run figures
    DIR/frontier.csv, frontier.md, speech_frontier.png    speech runs with a tag (a frontier
        sweep): per method and budget the accuracy over seeds, mean +- 95% t-interval
        (``analysis.frontier_points``: the fixed-rank split best on validation, with the grid
        tried); frontier_gaps.csv: each method minus that split, paired by seed
        (``analysis.frontier_gaps``)
Figures that do not apply (no spectra for vision, no trade-off curve without accuracy) are skipped.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from strlowrank.analysis import (
    Run,
    accuracy_column,
    budgets,
    frontier_gaps,
    frontier_points,
    load_runs,
    metrics,
    summaries,
)
from strlowrank.plotting import (
    plot_frontier,
    plot_layer_budget,
    plot_macs_accuracy,
    plot_rank_accuracy,
    plot_sparsity_accuracy,
    plot_sparsity_trajectory,
    run_figures,
    save_figure,
)

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
    """The comparison figures of the runs of one track, by file stem."""
    figs: dict[str, Figure] = {}
    summary = summaries(runs)
    budget = budgets(runs)
    if budget is not None:
        groups = _budget_groups(budget)
        for i, group in enumerate(groups):
            suffix = f"_{i + 1}" if len(groups) > 1 else ""
            figs[f"{track}_budget{suffix}"] = plot_layer_budget(
                _representatives(group, summary), f"Per-layer budget ({track})"
            )
    table = metrics(runs)
    if table is not None:
        figs[f"{track}_training"] = plot_sparsity_trajectory(table, f"Training ({track})")
    acc = summary["accuracy"]
    if acc.notna().any() and track == "vision" and summary["sparsity"].notna().any():
        figs["vision_sparsity_accuracy"] = plot_sparsity_accuracy(summary)
        if "macs_sparse" in summary and summary["macs_sparse"].notna().any():
            figs["vision_macs_accuracy"] = plot_macs_accuracy(summary)
    if acc.notna().any() and track == "speech" and summary["rank_total"].notna().any():
        figs["speech_rank_accuracy"] = plot_rank_accuracy(summary)
    return figs


def _cell(value: object, fmt: str) -> str:
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
            cells.append(_cell(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interval(row: pd.Series, fmt: str) -> str:
    """'mean +- half width' of an ``analysis.aggregate`` row in percent (points); the half
    width is left out when it is unknown (one seed)."""
    ci = f" +- {100 * row['ci']:.2f}" if pd.notna(row["ci"]) else ""
    return f"{100 * row['mean']:{fmt}}{ci}"


def frontier_markdown(points: pd.DataFrame) -> str:
    """The frontier as a markdown table: accuracy in % as mean +- 95% half width (n seeds)."""
    lines = [
        "| method | budget | params (K) | accuracy % (mean +- 95%) | sd | n | split | "
        "splits tried (mean %) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in points.iterrows():
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['params'] / 1e3:.1f} | "
            f"{_interval(r, '.2f')} | {_cell(100 * r['sd'], '.2f')} | {r['n']} | "
            f"{r['split']} | {r.get('splits') or ''} |"
        )
    return "\n".join(lines) + "\n"


def gaps_markdown(gaps: pd.DataFrame) -> str:
    """Paired gaps to the best fixed split as a markdown table, in accuracy points."""
    lines = [
        "| method | budget | params (K) | minus best fixed split, points (mean +- 95%, "
        "paired by seed) | n | fixed split |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in gaps.iterrows():
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['params'] / 1e3:.1f} | "
            f"{_interval(r, '+.2f')} | {r['n']} | {r['baseline_split']} |"
        )
    return "\n".join(lines) + "\n"


def write_frontier(summary: pd.DataFrame, out: Path) -> list[Path]:
    """frontier.csv, frontier.md and speech_frontier.png when speech runs carry a tag."""
    rows = summary[summary["track"] == "speech"] if "track" in summary else summary
    if "tag" not in rows or not rows["tag"].notna().any():
        return []
    tagged = rows[rows["tag"].notna()]
    points = frontier_points(tagged)
    points.to_csv(out / "frontier.csv", index=False)
    text = frontier_markdown(points)
    if (points["method"] == "lowrank").any() and "seed" in tagged:
        gaps = frontier_gaps(tagged)
        gaps.to_csv(out / "frontier_gaps.csv", index=False)
        text += "\nEach method minus the chosen fixed split at the same budget:\n\n"
        text += gaps_markdown(gaps)
    (out / "frontier.md").write_text(text)
    return [save_figure(plot_frontier(points), out / "speech_frontier.png")]


def write_report(runs: Sequence[Run], out: str | Path, per_run: bool = True) -> list[Path]:
    """Write every applicable figure, runs.csv and summary.md into ``out``; return the PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for track in ("vision", "speech"):
        selected = [r for r in runs if r.track == track]
        if selected:
            for stem, fig in track_figures(track, selected).items():
                written.append(save_figure(fig, out / f"{stem}.png"))
    if per_run:
        for run in runs:
            folder = out / "runs" / run.label.replace("/", "__")
            for stem, fig in run_figures(run).items():
                written.append(save_figure(fig, folder / f"{stem}.png"))
    summary = summaries(runs)
    summary.to_csv(out / "runs.csv", index=False)
    written += write_frontier(summary, out)
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
