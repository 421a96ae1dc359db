"""The speech track's frontier protocol: accuracy against recurrent parameters per method and
budget, over seeds (docs/LEARNED_RANK.md section 3, the grids configs/sweep_speech_frontier*.yaml).

A frontier sweep tags each run with its budget (``tag``); a run started from a trained model
(``model.init_from``) is the SVD baseline of its method (``svd-lowrank``: the truncated SVD,
``svd-str``: STR from the SVD, ``svd-energy`` / ``svd-greedy``: ranks allocated from the trained
model's spectra, ``model.allocation``); STR with another threshold unit than the default
``init`` is ``str-<unit>`` (``svd-str-cost``), and a model fine-tuned at the ranks its STR
source learned (``model.allocation learned``) is ``str-fixed`` (``svd-str-fixed`` when that
STR run started from a trained model). Every point carries its
compute, ``cost_epochs``: the training epochs of its runs including the full-rank run an SVD
start needs, and one more fine-tuning per extra split tried when a fixed split is chosen from a
grid. The tables read a sweep's results.csv or ``analysis.summaries``:

    frontier_runs(table)     the finished runs labelled with method, budget, split and layout
    frontier_points(table)   per method and budget: mean +- 95% t-interval over seeds, the
                             fixed-rank split chosen on validation accuracy, every split tried
    frontier_gaps(table)     each method minus the chosen fixed split, paired by seed
    plot_frontier(points)    parameters (log) against accuracy, one line per method and layout

``speech.report`` writes them into ``python -m strlowrank.report``'s folder.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from strlowrank.analysis import accuracy_column, aggregate
from strlowrank.analysis.plotting import (
    METHOD_MARKERS,
    method_color,
    new_figure,
    percent_axis,
    styled,
)
from strlowrank.method.rnn import GATES


def frontier_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The finished runs of a frontier sweep labelled with ``method``, ``budget`` and
    ``split``: a run's method is its ``method`` (full | lowrank | str), prefixed ``svd-`` when it
    started from a trained model (``init_from``); its budget is its ``tag``; a fixed-rank run's
    split is its ranks 'r_1/r_2/...' in matrix order ('' for the other methods); its ``layout``
    is the model's matrix split (stacked | per_gate; stacked when not recorded), with
    `` x<layers>`` for a model of more than one recurrent layer and the cell first when it is
    not a GRU ("lstm stacked")."""
    t = table
    if "status" in t:
        t = t[t["status"].isin(["ok", "done"])]
    t = t.copy()
    init = t["init_from"] if "init_from" in t else pd.Series(None, index=t.index, dtype=object)
    started = init.notna() & (init.astype(str) != "")
    method = t["method"].astype(str)
    if "allocation" in t:  # ranks allocated from the trained model's spectra
        rule = t["allocation"].fillna("fixed").astype(str)
        method = method.where(rule == "fixed", rule)
    if "threshold_scale" in t:  # STR with another threshold unit than the default's (init)
        unit = t["threshold_scale"].fillna("init").astype(str)
        method = method.where((method != "str") | unit.isin(["init", "None"]), "str-" + unit)
    t["method"] = method.where(~started, "svd-" + method)
    if "allocation" in t:  # an STR run's learned ranks, then fine-tuned at them
        src = t["source_init_from"] if "source_init_from" in t else pd.Series(None, index=t.index)
        fixed = np.where(src.notna() & (src.astype(str) != ""), "svd-str-fixed", "str-fixed")
        t["method"] = t["method"].where(t["allocation"].astype(str) != "learned", fixed)
    t["budget"] = t["tag"].fillna("").astype(str) if "tag" in t else ""
    layout = t["split"].fillna("stacked").astype(str) if "split" in t else "stacked"
    if "layers" in t:  # a multi-layer model's layout names its depth: "stacked x2"
        depth = pd.to_numeric(t["layers"], errors="coerce").fillna(1).astype(int)
        layout = (layout + " x" + depth.astype(str)).where(depth > 1, layout)
    if "cell" in t:  # another cell than the GRU names it: "lstm stacked"
        cell = t["cell"].fillna("gru").astype(str)
        layout = (cell + " " + layout).where(cell != "gru", layout)
    t["layout"] = layout
    rank_cols = [c for c in t.columns if c.startswith("ranks.")]

    def split(row: pd.Series) -> str:
        if not str(row["method"]).endswith("lowrank"):
            return ""
        return "/".join(str(int(row[c])) for c in rank_cols if pd.notna(row[c]))

    t["split"] = t.apply(split, axis=1) if len(t) else ""
    return t


def _point_keys(runs: pd.DataFrame) -> list[str]:
    """What makes two runs two frontier points besides their split: the method, the matrix
    layout, the budget and, where recorded, the compute (STR for 20 and for 30 epochs)."""
    return ["method", "layout", "budget", *(["cost_epochs"] if "cost_epochs" in runs else [])]


def frontier_points(
    table: pd.DataFrame, value: str | None = None, charge_splits: bool = True
) -> pd.DataFrame:
    """The parameter/accuracy frontier of a sweep, one row per method and budget.

    ``table``: results.csv of a sweep or ``analysis.summaries`` (columns method, tag, init_from,
    params, ranks.*, and test_acc / val_acc / accuracy), labelled by :func:`frontier_runs`.
    Every (method, layout, budget, split) is aggregated over its seeds (``analysis.aggregate``,
    ``params`` = mean recurrent parameters), so one method in two layouts or at two costs at a
    budget is two points. Per method, layout, budget and cost one split is kept: the one
    with the best mean validation accuracy when ``value`` is the test accuracy and val_acc is
    known (so the reported test mean is not the maximum of several noisy test means), else the
    best mean of ``value``; ``splits`` lists every split tried with its mean ``value`` (the
    grid), ``select`` the column the split was chosen by and ``layout`` the matrix layout.
    ``charge_splits`` adds one fine-tuning per extra split tried to a point's ``cost_epochs``
    (off: the cost of its runs, which identifies them).
    """
    t = frontier_runs(table)
    value = value or (accuracy_column(t) if "accuracy" not in t else "accuracy")
    select = "val_acc" if value == "test_acc" and "val_acc" in t else value
    point = _point_keys(t)
    keys = [*point, "split"]
    costs = [c for c in ("cost_epochs", "epochs") if c in t]
    extra = ["params", *(c for c in costs if c not in point)]
    points = aggregate(t, keys, value, extra=extra)
    points["_select"] = aggregate(t, keys, select)["mean"].to_numpy() if len(points) else []
    grid = (
        points.groupby(point, sort=False)
        .apply(
            lambda g: "; ".join(f"{s}: {100 * m:.2f}" for s, m in zip(g["split"], g["mean"]) if s),
            include_groups=False,
        )
        .rename("splits")
    )
    best = points.sort_values("_select", ascending=False, kind="stable")
    best = best.drop_duplicates(point).join(grid, on=point)
    best = best.drop(columns="_select").assign(select=select)
    if charge_splits and len(costs) == 2:  # a split chosen from a grid: a fine-tuning per split
        tried = points[points["split"] != ""].groupby(point)["split"].nunique()
        extra = [max(tried.get(k, 1) - 1, 0) for k in zip(*(best[c] for c in point))]
        best["cost_epochs"] = (
            best["cost_epochs"] + pd.Series(extra, index=best.index) * best["epochs"]
        )
    return best.sort_values(["method", "params"], kind="stable").reset_index(drop=True)


def frontier_gaps(
    table: pd.DataFrame, baseline: str = "lowrank", value: str | None = None, level: float = 0.95
) -> pd.DataFrame:
    """Each method's accuracy minus the baseline's at the same budget, paired by seed.

    The baseline at a budget, and any other fixed-rank method there, is the split
    :func:`frontier_points` keeps (e.g. ``baseline="svd-lowrank"`` compares the fine-tuned
    methods with the truncated SVD at its chosen split). For every other method
    and budget (and seed s present in both) d_s = acc(method, s) - acc(baseline, s); the rows
    give mean, sd, n and the Student-t interval of d over the seeds (``analysis.aggregate``).
    Pairing removes what a seed does to both runs (the same data order), so the interval is
    usually narrower than the difference of two independent intervals. Columns: method, layout,
    budget, n, mean, sd, ci, lo, hi, params (the method's), baseline_split.
    """
    t = frontier_runs(table)
    value = value or (accuracy_column(t) if "accuracy" not in t else "accuracy")
    points = frontier_points(table, value, charge_splits=False)
    point = _point_keys(t)
    kept = points.set_index(point)["split"]
    t = t[[kept.get(k) == s for k, s in zip(zip(*(t[c] for c in point)), t["split"])]]
    chosen = points[points["method"] == baseline].drop_duplicates("budget")
    chosen = chosen.set_index("budget")["split"]
    base = t[t["method"] == baseline].drop_duplicates(["budget", "seed"])
    base = base.set_index(["budget", "seed"])[value].rename("_base")
    rest = t[(t["method"] != baseline) & t["budget"].isin(chosen.index)]
    rest = rest.merge(base.reset_index(), on=["budget", "seed"], how="inner")
    rest["gap"] = pd.to_numeric(rest[value]) - rest["_base"]
    gaps = aggregate(rest, point, "gap", level=level, extra=["params"])
    gaps["baseline_split"] = gaps["budget"].map(chosen)
    return gaps.sort_values(["method", "layout", "params"], kind="stable").reset_index(drop=True)


def split_label(split: str, layout: str) -> str:
    """A fixed-rank split as r_W/r_U per layer: per gate, the gates of one matrix share a rank
    (``GATES``: 3 in a GRU, 4 in an LSTM), so '8/8/8/6/6/6' is drawn as '8/6'. ``layout`` as
    :func:`frontier_runs` writes it (the cell first when it is not a GRU)."""
    ranks = split.split("/")
    gates = GATES.get(layout.split(" ")[0], GATES["gru"])
    groups = [ranks[i : i + gates] for i in range(0, len(ranks), gates)]
    if "per_gate" not in layout or any(len(set(g)) != 1 for g in groups):
        return split
    return "/".join(g[0] for g in groups)


def _line_name(method: str, layout: str, cost: float, costs: pd.Series) -> tuple[str, str]:
    """A frontier line's label and style: per gate dashed; where a method and layout come at
    several costs (``costs``: their nunique and max), each line names its epochs and the cheaper
    ones are dotted."""
    label = f"{method}, {layout.replace('_', ' ')}" if layout != "stacked" else method
    style = "--" if "per_gate" in layout else "-"
    if costs["nunique"] > 1:
        return f"{label}, {cost:g} epochs", style if cost == costs["max"] else ":"
    return label, style


@styled
def plot_frontier(
    points: pd.DataFrame, title: str = "Parameters vs accuracy", max_cost: float | None = None
) -> Figure:
    """The frontier: mean accuracy against mean recurrent parameters (K) per method and
    budget, with 95% t-intervals over seeds (:func:`frontier_points` rows); the full-rank
    point as a star and a dashed reference; fixed-rank points labelled with their best split.
    Every layout gets its own line: a per-gate layout dashed (else solid), and a model other
    than the one-layer GRU (``layout`` "stacked x2", "lstm per_gate", ...) open markers and a
    thinner line, so two layouts of one method never look alike. The x axis is logarithmic
    (small budgets are where methods differ); the y axis starts 4 points below the lowest mean
    and ends at most 2 points above the highest, so a longer interval runs off. ``max_cost``
    keeps only the points trained with at most that many epochs (``cost_epochs``): the frontier
    at a given compute."""
    if max_cost is not None and "cost_epochs" in points:
        points = points[points["cost_epochs"] <= max_cost]
        title = f"{title} (at most {max_cost:g} training epochs)"
    fig, (ax,) = new_figure(size=(9.0, 4.8))
    if "layout" not in points:
        points = points.assign(layout="stacked")
    if "cost_epochs" not in points:
        points = points.assign(cost_epochs=float("nan"))
    most = points.groupby(["method", "layout"])["cost_epochs"].agg(["nunique", "max"])
    for (method, layout, cost), rows in points.groupby(
        ["method", "layout", "cost_epochs"], sort=False, dropna=False
    ):
        rows = rows.sort_values("params")
        color, marker = method_color(str(method)), METHOD_MARKERS.get(str(method), "o")
        layout = str(layout)
        other = layout not in ("stacked", "per_gate")  # another model: two layers, an LSTM
        label, style = _line_name(str(method), layout, cost, most.loc[(method, layout)])
        ax.errorbar(
            rows["params"] / 1e3,
            rows["mean"],
            yerr=rows["ci"].fillna(0.0),
            color=color,
            marker=marker,
            capsize=3,
            label=label,
            markersize=9 if method == "full" else 6,
            linestyle=style,
            linewidth=1.0 if other else 1.5,
            markerfacecolor="white" if other or layout == "per_gate" else color,
        )
        if method == "full":
            ax.axhline(rows["mean"].mean(), color=color, linestyle="--", linewidth=1, alpha=0.6)
        for _, row in rows[rows["split"].astype(str) != ""].iterrows():
            ax.annotate(
                split_label(str(row["split"]), layout),
                (row["params"] / 1e3, row["mean"]),
                fontsize=8,
                xytext=(5, -11),
                textcoords="offset points",
                color=color,
            )
    _frontier_axes(ax, points)
    ax.set_xlabel("recurrent parameters (K, mean over seeds, log scale)")
    ax.set_ylabel("accuracy (mean, 95% interval over seeds)")
    ax.legend(title="method", loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines
    ax.set_title(title)
    return fig


def _frontier_axes(ax, points: pd.DataFrame) -> None:
    """Percent y axis, log x axis in plain numbers; the means set the y range, so one
    seed-starved point's huge interval does not flatten the rest."""
    percent_axis(ax.yaxis)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low = points["mean"].min()
    high = (points["mean"] + points["ci"].fillna(0.0).clip(upper=0.01)).max()
    ax.set_ylim(low - 0.04, min(high + 0.01, 1.0))
