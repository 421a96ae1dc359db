"""The speech track's part of ``python -m strlowrank.report``: the frontier of tagged runs.

``write(summary, out)`` (the ``strlowrank.analysis.tracks.ReportPart`` the report calls with this
track's rows of ``analysis.summaries``) writes, when runs carry a ``tag`` (a frontier sweep):

    frontier.csv, frontier.md   per method and budget the accuracy over seeds, mean +- 95%
                                t-interval (``speech.frontier.frontier_points``: the fixed-rank
                                split best on validation, with the grid tried)
    frontier_gaps.csv           each method minus that split, paired by seed
    frontier_gaps_svd.csv       each method minus the truncated SVD of a trained model
                                (``speech.frontier.frontier_gaps``; also in frontier.md)
    speech_frontier.png         ``speech.frontier.plot_frontier``
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from speech.frontier import frontier_gaps, frontier_points, plot_frontier
from strlowrank.analysis.plotting import save_figure
from strlowrank.analysis.report import format_cell


def _interval(row: pd.Series, fmt: str) -> str:
    """'mean +- half width' of an ``analysis.aggregate`` row in percent (points); the half
    width is left out when it is unknown (one seed)."""
    ci = f" +- {100 * row['ci']:.2f}" if pd.notna(row["ci"]) else ""
    return f"{100 * row['mean']:{fmt}}{ci}"


def frontier_markdown(points: pd.DataFrame) -> str:
    """The frontier as a markdown table: accuracy in % as mean +- 95% half width (n seeds)."""
    lines = [
        "| method | layout | budget | epochs (cost) | params (K) | accuracy % (mean +- 95%) | sd | "
        "n | split | splits tried (mean %) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in points.iterrows():
        lines.append(
            f"| {r['method']} | {r.get('layout', 'stacked')} | {r['budget']} | "
            f"{format_cell(r.get('cost_epochs', float('nan')), '.0f')} | {r['params'] / 1e3:.1f} | "
            f"{_interval(r, '.2f')} | {format_cell(100 * r['sd'], '.2f')} | {r['n']} | "
            f"{r['split']} | {r.get('splits') or ''} |"
        )
    return "\n".join(lines) + "\n"


def gaps_markdown(gaps: pd.DataFrame) -> str:
    """Paired gaps to the best fixed split as a markdown table, in accuracy points."""
    lines = [
        "| method | layout | budget | epochs (cost) | params (K) | minus best fixed split, points "
        "(mean +- 95%, paired by seed) | n | fixed split |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in gaps.iterrows():
        lines.append(
            f"| {r['method']} | {r.get('layout', 'stacked')} | {r['budget']} | "
            f"{format_cell(r.get('cost_epochs', float('nan')), '.0f')} | {r['params'] / 1e3:.1f} | "
            f"{_interval(r, '+.2f')} | {r['n']} | {r['baseline_split']} |"
        )
    return "\n".join(lines) + "\n"


def write(summary: pd.DataFrame, out: Path) -> list[Path]:
    """frontier.csv, frontier.md (with the paired gaps) and speech_frontier.png when runs carry a
    tag; returns the PNG written (none without tagged runs)."""
    if "tag" not in summary or not summary["tag"].notna().any():
        return []
    tagged = summary[summary["tag"].notna()]
    points = frontier_points(tagged)
    points.to_csv(out / "frontier.csv", index=False)
    text = frontier_markdown(points)
    baselines = (
        ("lowrank", "frontier_gaps.csv", "the chosen fixed split"),
        ("svd-lowrank", "frontier_gaps_svd.csv", "the truncated SVD at its chosen split"),
    )
    for baseline, name, what in baselines:
        if (points["method"] == baseline).any() and "seed" in tagged:
            gaps = frontier_gaps(tagged, baseline=baseline)
            gaps.to_csv(out / name, index=False)
            text += f"\nEach method minus {what} at the same budget:\n\n"
            text += gaps_markdown(gaps)
    (out / "frontier.md").write_text(text)
    return [save_figure(plot_frontier(points), out / "speech_frontier.png")]
