"""The speech track's frontier protocol (speech.frontier, speech.report) on hand-made sweep rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from speech import report
from speech.frontier import frontier_gaps, frontier_points, plot_frontier, split_label
from strlowrank.analysis import aggregate


def test_frontier_points_pick_the_best_split_per_budget():
    def row(method, tag, acc, params, ranks=(None, None), init=None, seed=0):
        return {
            "method": method,
            "tag": tag,
            "test_acc": acc,
            "params": params,
            "seed": seed,
            "ranks.rnns.0.W": ranks[0],
            "ranks.rnns.0.U": ranks[1],
            "init_from": init,
            "status": "ok",
        }

    rows = [row("full", "full", 0.80 + 0.01 * s, 61440, (32, 128), seed=s) for s in range(3)]
    rows += [row("lowrank", "b5k", 0.70 + 0.01 * s, 4928, (2, 8), seed=s) for s in range(3)]
    rows += [row("lowrank", "b5k", 0.74 + 0.01 * s, 5248, (4, 7), seed=s) for s in range(3)]
    rows += [row("lowrank", "b5k", 0.76, 5248, (4, 7), init="x/ckpt.pt", seed=s) for s in range(2)]
    rows += [row("str", "b5k", 0.72, 5000, (3, 7), seed=0), row("str", "b5k", 0.0, 0, seed=1)]
    rows[-1]["status"] = "failed (1)"
    rows += [row("str", "x2b5k", 0.7, 5000, seed=0) | {"layers": 2, "split": "stacked"}]
    rows += [row("str", "l5k", 0.7, 5000, seed=0) | {"cell": "lstm", "split": "per_gate"}]
    table = frontier_points(pd.DataFrame(rows)).set_index(["method", "budget"])
    assert list(table.index) == [
        ("full", "full"),
        ("lowrank", "b5k"),
        ("str", "b5k"),
        ("str", "x2b5k"),
        ("str", "l5k"),
        ("svd-lowrank", "b5k"),
    ]
    assert table.loc[("str", "l5k"), "layout"] == "lstm per_gate"
    assert table.loc[("str", "x2b5k"), "layout"] == "stacked x2"  # a 2-layer model says so
    assert table.loc[("str", "b5k"), "layout"] == "stacked"  # layers, split not recorded
    best = table.loc[("lowrank", "b5k")]
    assert best["split"] == "4/7" and best["n"] == 3 and best["mean"] == pytest.approx(0.75)
    assert best["splits"] == "2/8: 71.00; 4/7: 75.00"
    assert table.loc[("str", "b5k"), "n"] == 1  # the failed seed is left out
    assert table.loc[("str", "b5k"), "split"] == ""  # learned ranks vary over seeds
    assert table.loc[("svd-lowrank", "b5k"), "mean"] == pytest.approx(0.76)
    assert table.loc[("svd-lowrank", "b5k"), "sd"] == pytest.approx(0.0)


def test_frontier_split_chosen_by_validation_and_paired_gaps():
    def row(method, acc, val, ranks, seed):
        return {
            "method": method,
            "tag": "b5k",
            "test_acc": acc,
            "val_acc": val,
            "seed": seed,
            "params": 5000,
            "ranks.rnns.0.W": ranks[0],
            "ranks.rnns.0.U": ranks[1],
            "status": "ok",
        }

    seeds = range(3)
    rows = [row("lowrank", 0.70 + 0.02 * s, 0.60, (2, 8), s) for s in seeds]  # best on val
    rows += [row("lowrank", 0.75, 0.50, (4, 7), s) for s in seeds]  # best on test only
    rows += [row("str", 0.71 + 0.02 * s + 0.01 * (s == 2), 0.6, (3, 7), s) for s in seeds]
    table = pd.DataFrame(rows)
    best = frontier_points(table).set_index("method").loc["lowrank"]
    assert best["split"] == "2/8" and best["select"] == "val_acc"
    assert best["mean"] == pytest.approx(0.72)
    assert (
        frontier_points(table, "val_acc").set_index("method").loc["lowrank", "select"] == "val_acc"
    )
    gaps = frontier_gaps(table).set_index("method")
    assert list(gaps.index) == ["str"] and gaps.loc["str", "baseline_split"] == "2/8"
    d = np.array([0.01, 0.01, 0.02])  # str - lowrank 2/8, seed by seed
    assert gaps.loc["str", "mean"] == pytest.approx(d.mean())
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert gaps.loc["str", "ci"] == pytest.approx(half)
    unpaired = aggregate(table[table["method"] == "str"], ["method"], "test_acc")
    assert gaps.loc["str", "ci"] < unpaired["ci"].iloc[0]  # pairing removes the seed effect
    reverse = frontier_gaps(table, baseline="str").set_index("method")
    assert reverse.loc["lowrank", "n"] == 3  # only the kept split, not all six runs
    assert reverse.loc["lowrank", "mean"] == pytest.approx(-d.mean())


def test_two_layouts_of_a_method_at_one_budget_are_two_points_and_two_gaps():
    """STR stacked and per gate under one budget tag are kept apart, each paired with the
    baseline by seed."""
    rows = []
    for s in range(3):
        base = {"tag": "b5k", "seed": s, "status": "ok", "params": 5000}
        rows.append(base | {"method": "lowrank", "test_acc": 0.70, "ranks.rnns.0.W": 2})
        rows.append(base | {"method": "str", "split": "stacked", "test_acc": 0.71 + 0.01 * s})
        rows.append(base | {"method": "str", "split": "per_gate", "test_acc": 0.75})
    table = pd.DataFrame(rows)
    points = frontier_points(table).set_index(["method", "layout"])
    assert points.loc[("str", "stacked"), "mean"] == pytest.approx(0.72)
    assert points.loc[("str", "per_gate"), "mean"] == pytest.approx(0.75)
    gaps = frontier_gaps(table).set_index(["method", "layout"])
    assert gaps.loc[("str", "stacked"), "mean"] == pytest.approx(0.02)
    assert gaps.loc[("str", "per_gate"), "mean"] == pytest.approx(0.05)
    assert (gaps["n"] == 3).all()


def test_frontier_labels_a_per_gate_split_by_matrix():
    assert split_label("8/8/8/6/6/6/8/8/8/6/6/6", "per_gate x2") == "8/6/8/6"
    assert split_label("6/6/6/6/6/6/6/6", "lstm per_gate") == "6/6"
    assert split_label("10/10/10/10", "stacked x2") == "10/10/10/10"  # stacked: as it is
    assert split_label("1/2/3/4/5/6", "per_gate") == "1/2/3/4/5/6"  # gates differ: as it is


def test_frontier_draws_every_layout_of_a_method_differently():
    layouts = ["stacked", "per_gate", "stacked x2", "per_gate x2", "lstm stacked", "lstm per_gate"]
    points = pd.DataFrame(
        [
            {"method": "str", "layout": layout, "budget": "b", "params": 1e4, "mean": 0.9}
            | {"ci": 0.01, "split": ""}
            for layout in layouts
        ]
    )
    fig = plot_frontier(points)
    lines = [c.lines[0] for c in fig.axes[0].containers]
    assert len(lines) == len(layouts)
    # within a family (one-layer GRU, two-layer GRU, LSTM) stacked is solid and per gate dashed
    for stacked, per_gate in [(0, 1), (2, 3), (4, 5)]:
        assert lines[stacked].get_linestyle() == "-"
        assert lines[per_gate].get_linestyle() == "--"
    # and the families differ: only the one-layer stacked GRU has filled markers
    assert [ln.get_markerfacecolor() == "white" for ln in lines] == [False] + [True] * 5
    assert lines[0].get_linewidth() > lines[2].get_linewidth()


def test_frontier_is_drawn_in_the_project_style():
    assert hasattr(plot_frontier, "__wrapped__") and not hasattr(split_label, "__wrapped__")


def test_report_part_writes_the_frontier_of_tagged_runs(tmp_path: Path):
    """speech.report.write (the report's door into this track): frontier.csv / .md, the paired
    gaps and the figure for tagged runs; nothing for untagged ones."""
    rows = [
        {"method": m, "tag": "b5k", "seed": s, "params": 5000, "test_acc": acc + 0.01 * s}
        | {"val_acc": 0.6, "ranks.rnns.0.W": 2 if m == "lowrank" else None, "ranks.rnns.0.U": 8}
        for m, acc in (("lowrank", 0.70), ("str", 0.72))
        for s in range(3)
    ]
    summary = pd.DataFrame(rows)
    written = report.write(summary, tmp_path)
    assert [p.name for p in written] == ["speech_frontier.png"]
    assert {p.name for p in tmp_path.iterdir()} == {
        "frontier.csv",
        "frontier.md",
        "frontier_gaps.csv",
        "speech_frontier.png",
    }
    table = (tmp_path / "frontier.md").read_text()
    assert "| str | stacked | b5k |  | 5.0 | 73.00 +- 2.48 | 1.00 | 3 |  |" in table
    assert "| str | stacked | b5k |  | 5.0 | +2.00 +- 0.00 | 3 | 2/8 |" in table
    assert report.write(summary.drop(columns="tag"), tmp_path / "none") == []


def test_points_charge_their_compute_and_name_allocations():
    """A truncated SVD pays for its full-rank source and one fine-tuning per split tried; an
    allocated run is its own method; a budget with only a baseline has no gaps (no crash)."""

    def row(method, tag, acc, seed, epochs, cost, ranks=(None, None), init=None, rule="fixed"):
        return {
            "method": method,
            "tag": tag,
            "test_acc": acc,
            "val_acc": acc,
            "params": 5000,
            "seed": seed,
            "ranks.rnns.0.W": ranks[0],
            "ranks.rnns.0.U": ranks[1],
            "init_from": init,
            "allocation": rule,
            "epochs": epochs,
            "cost_epochs": cost,
            "status": "ok",
        }

    rows = []
    for s in range(3):
        rows += [row("full", "full", 0.9, s, 20, 20, (32, 128))]
        rows += [row("lowrank", "b5k", 0.8, s, 10, 30, (4, 7), init="f/checkpoint.pt")]
        rows += [row("lowrank", "b5k", 0.7, s, 10, 30, (2, 9), init="f/checkpoint.pt")]
        rows += [row("lowrank", "b5k", 0.82, s, 10, 30, (3, 8), "f/checkpoint.pt", "greedy")]
        rows += [row("str", "b5k", 0.81 + 0.01 * s, s, 30, 30)]
        rows += [row("lowrank", "b9k", 0.85, s, 20, 20, (8, 9))]
    points = frontier_points(pd.DataFrame(rows)).set_index(["method", "budget"])
    assert points.loc[("svd-lowrank", "b5k"), "cost_epochs"] == 30 + 10  # two splits tried
    assert points.loc[("svd-greedy", "b5k"), "cost_epochs"] == 30
    assert points.loc[("svd-greedy", "b5k"), "split"] == ""  # one allocation, not a grid
    assert points.loc[("str", "b5k"), "cost_epochs"] == 30
    gaps = frontier_gaps(pd.DataFrame(rows), baseline="svd-lowrank").set_index("method")
    assert gaps.loc["svd-greedy", "mean"] == pytest.approx(0.02)
    assert gaps.loc["str", "mean"] == pytest.approx(0.02) and gaps.loc["str", "n"] == 3
    alone = frontier_gaps(pd.DataFrame([r for r in rows if r["tag"] == "b9k"]))
    assert alone.empty
    fig = plot_frontier(points.reset_index(), max_cost=30)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "svd-lowrank" not in labels and "svd-greedy" in labels and "str" in labels


def test_frontier_draws_one_line_per_compute_and_a_color_per_method():
    """STR at 20 and 30 epochs are two lines named by their epochs; the compressed methods get
    colors of their own."""
    from matplotlib.colors import to_hex

    base = {"layout": "stacked", "budget": "b", "ci": 0.01, "split": ""}
    points = pd.DataFrame(
        [
            base | {"method": "str", "params": p, "mean": 0.9, "cost_epochs": c}
            for p in (5e3, 1e4)
            for c in (20, 30)
        ]
        + [
            base | {"method": m, "params": 5e3, "mean": 0.9, "cost_epochs": 30}
            for m in ("svd-lowrank", "svd-energy", "svd-greedy", "str-fixed")
        ]
    )
    ax = plot_frontier(points).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "str, 20 epochs" in labels and "str, 30 epochs" in labels
    colors = {c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers}
    methods = ["svd-lowrank", "svd-energy", "svd-greedy", "str-fixed", "str, 30 epochs"]
    assert len({colors[m] for m in methods}) == len(methods)
