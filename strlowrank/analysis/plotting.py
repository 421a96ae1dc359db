"""Figures of where a network puts its parameters: one implementation of each plot.

Every plot is a pure function of the tables of :mod:`strlowrank.analysis` and returns a
``matplotlib.figure.Figure`` (no pyplot, no display: PNGs are written with the Agg renderer).
One style (:func:`style`) and one color per method serve every figure; units: sparsity and
accuracy in percent, MACs in millions (M) per example, parameters in thousands (K).

    plot_layer_budget      per-layer sparsity and MACs, runs side by side, in network order
    plot_sparsity_accuracy / plot_macs_accuracy / plot_rank_accuracy    trade-offs across runs
    plot_sparsity_trajectory, plot_threshold_trajectory, plot_rank_trajectory    over epochs
    plot_spectra           singular values at init and at the end, with the threshold marked
    plot_run(run_dir)      writes the single-run figures into run_dir/plots/

A track draws its own figures with the same parts: ``styled`` (the project style),
``new_figure``, ``percent_axis``, ``method_color`` and ``METHOD_MARKERS``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec

import numpy as np
import pandas as pd
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from strlowrank import analysis
from strlowrank.analysis import Run, accuracy_column, layer_order

METHOD_COLORS = {
    "dense": "#4d4d4d",
    "full": "#4d4d4d",
    "str": "#1f77b4",
    "gmp": "#ff7f0e",
    "uniform": "#2ca02c",
    "transfer": "#9467bd",
    "lowrank": "#d62728",
    "svd-lowrank": "#7f7f7f",
    "svd-energy": "#bcbd22",
    "svd-greedy": "#8c564b",
    "svd-str": "#17becf",
    "svd-str-cost": "#9edae5",
    "str-fixed": "#e377c2",
    "svd-str-fixed": "#f7b6d2",
}
_EXTRA_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")
METHOD_MARKERS = {
    "dense": "s",
    "full": "*",
    "str": "o",
    "gmp": "^",
    "uniform": "v",
    "transfer": "D",
    "lowrank": "s",
}
_HATCHES = ("", "//", "..", "xx", "\\\\", "--")
_LINESTYLES = ("-", "--", ":", "-.")
RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    "lines.markersize": 6,
    "image.cmap": "viridis",
}
DPI = 130
MAX_LEGEND = 12  # more lines than this get a colorbar (layers) or one entry per method (runs)
P = ParamSpec("P")


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The rcParams every figure of the toolkit is made (and saved) under."""
    with rc_context(RC):
        yield


def styled(plot: Callable[P, Figure]) -> Callable[P, Figure]:
    """Run a plot function under :func:`style` (legends and texts read rcParams when made)."""

    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with style():
            return plot(*args, **kwargs)

    return wrapper


def wrapped(text: str, width: int = 90) -> str:
    """``text`` in lines of at most ``width`` characters (long run names break anywhere), so a
    title or legend entry stays inside its figure."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def method_color(method: str) -> str:
    """The one color of a method in every figure (unknown methods get a stable extra color)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def new_figure(
    nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.4), **kwargs
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure with styled axes (returned as a flat array)."""
    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, **kwargs)).ravel()
    for ax in axes:
        ax.tick_params(labelsize=RC["xtick.labelsize"])
        ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, axes


def percent_axis(axis) -> None:
    """Tick labels of ``axis`` in percent (values are fractions)."""
    axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with style():
        fig.savefig(path, dpi=DPI)
    return path


def _run_styles(table: pd.DataFrame) -> dict[str, dict]:
    """Per run: its method's color, and a hatch / linestyle telling repeats of a method apart."""
    seen: dict[str, int] = {}
    out = {}
    for run, method in dict(zip(table["run"], table["method"])).items():
        i = seen.get(method, 0)
        seen[method] = i + 1
        out[run] = {
            "method": method,
            "color": method_color(method),
            "first": i == 0,
            "hatch": _HATCHES[i % len(_HATCHES)],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        }
    for run, st in out.items():  # legend label: each run, or each method when there are many
        st["label"] = (
            wrapped(f"{run} ({st['method']})", 70)
            if len(out) <= MAX_LEGEND
            else (st["method"] if st["first"] else "_nolegend_")
        )
    return out


def _layer_ticks(ax: Axes, names: list[str]) -> None:
    """Layer names on the y axis, top to bottom in network order; every n-th beyond 60 layers."""
    step = max(1, math.ceil(len(names) / 60))
    ticks = list(range(0, len(names), step))
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=8 if len(names) > 25 else 9)
    ax.set_ylim(len(names) - 0.5, -0.5)


@styled
def plot_layer_budget(budget: pd.DataFrame, title: str = "Per-layer budget") -> Figure:
    """Horizontal bars per layer (network order, top to bottom), one bar per run, colored by
    method: sparsity (% of weights zero) and, when known, MACs per example (M) with the dense
    MACs marked '|'. ``budget``: :func:`strlowrank.analysis.budgets` rows (run, method, ...)."""
    names = layer_order(budget)
    styles = _run_styles(budget)
    has_macs = "macs_sparse" in budget and budget["macs_sparse"].notna().any()
    n, k = len(names), len(styles)
    height = min(40.0, max(3.2, 0.17 * n * max(1.0, k**0.6) + 1.6))
    fig, axes = new_figure(1, 2 if has_macs else 1, (11 if has_macs else 7, height), sharey=True)
    bar = 0.8 / k
    for i, (run, st) in enumerate(styles.items()):
        rows = budget[budget["run"] == run].drop_duplicates("name").set_index("name")
        rows = rows.reindex(names)
        y = np.arange(n) + (i - (k - 1) / 2) * bar
        kw = {
            "height": bar,
            "color": st["color"],
            "hatch": st["hatch"],
            "edgecolor": "white" if not st["hatch"] else "black",
            "linewidth": 0.3,
        }
        axes[0].barh(y, rows["sparsity"], label=st["label"], **kw)
        if has_macs:
            axes[1].barh(y, rows["macs_sparse"] / 1e6, **kw)
    axes[0].set_xlim(0, 1)
    percent_axis(axes[0].xaxis)
    axes[0].set_xlabel("sparsity (% of weights zero)")
    _layer_ticks(axes[0], names)
    if has_macs:
        dense = budget.drop_duplicates("name").set_index("name")["macs_dense"].reindex(names)
        axes[1].scatter(dense / 1e6, np.arange(n), marker="|", s=120, color="black", zorder=3)
        axes[1].set_xlabel("MACs per example (M)")
    handles, labels = axes[0].get_legend_handles_labels()
    if has_macs:
        handles, labels = handles + axes[1].collections[-1:], [*labels, "dense MACs"]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    fig.suptitle(title)
    return fig


def _tradeoff(summary: pd.DataFrame, x: str, scale: float, ax: Axes) -> dict[str, pd.DataFrame]:
    """One line per method through its runs, seeds of a config averaged (std as error bars)."""
    acc = accuracy_column(summary)
    group = "group" if "group" in summary else "run"
    points = {}
    for method, rows in summary.groupby("method", sort=False):
        pts = rows.groupby(group, sort=False).agg(
            x=(x, "mean"), y=(acc, "mean"), err=(acc, "std"), n=(acc, "size")
        )
        pts = pts.dropna(subset=["x", "y"]).sort_values("x")
        if pts.empty:
            continue
        color = method_color(str(method))
        ax.plot(
            pts["x"] * scale,
            pts["y"],
            marker=METHOD_MARKERS.get(str(method), "o"),
            color=color,
            label=str(method),
            markersize=9 if method == "full" else 6,
        )
        if (pts["n"] > 1).any():
            ax.errorbar(
                pts["x"] * scale,
                pts["y"],
                yerr=pts["err"].fillna(0.0),
                fmt="none",
                ecolor=color,
                capsize=3,
                linewidth=1,
            )
        points[str(method)] = pts
    percent_axis(ax.yaxis)
    ax.set_ylabel(f"top-1 accuracy ({acc.split('_')[0]}, %)")
    ax.legend(title="method")
    return points


@styled
def plot_sparsity_accuracy(summary: pd.DataFrame, title: str = "Sparsity vs accuracy") -> Figure:
    """Accuracy against overall sparsity, one line per method (``analysis.summaries`` rows)."""
    fig, (ax,) = new_figure()
    _tradeoff(summary, "sparsity", 1.0, ax)
    percent_axis(ax.xaxis)
    ax.set_xlabel("overall sparsity (% of weights zero)")
    ax.set_title(title)
    return fig


@styled
def plot_macs_accuracy(summary: pd.DataFrame, title: str = "MACs vs accuracy") -> Figure:
    """Accuracy against MACs per example (M) of the sparse network, one line per method."""
    fig, (ax,) = new_figure()
    _tradeoff(summary, "macs_sparse", 1e-6, ax)
    ax.set_xlabel("MACs per example (M, sparse)")
    ax.set_title(title)
    return fig


def _rank_label(row: pd.Series) -> str:
    """'(r_W, r_U) = 16/25, 12.3K' from the ranks.* and params columns of one summary row."""
    ranks = [int(v) for k, v in row.items() if str(k).startswith("ranks.") and pd.notna(v)]
    text = "/".join(map(str, ranks))
    if "params" in row and pd.notna(row["params"]):
        text += f", {row['params'] / 1e3:.1f}K"
    return text


@styled
def plot_rank_accuracy(summary: pd.DataFrame, title: str = "Rank vs accuracy") -> Figure:
    """Low-rank models: accuracy against total rank (sum over W, U matrices), one line per method
    (learned-rank 'str', fixed 'lowrank'); the full-rank run as a star and a dashed reference.
    Each point is labelled with its ranks (r_W/r_U per layer) and recurrent parameters (K)."""
    fig, (ax,) = new_figure(size=(7.2, 4.8))
    points = _tradeoff(summary, "rank_total", 1.0, ax)
    group = "group" if "group" in summary else "run"
    for method, pts in points.items():
        firsts = summary[summary["method"] == method].drop_duplicates(group).set_index(group)
        for key, p in pts.iterrows():
            ax.annotate(
                _rank_label(firsts.loc[key]),
                (p["x"], p["y"]),
                fontsize=8,
                xytext=(5, -11),
                textcoords="offset points",
                color=method_color(method),
            )
        if method == "full":
            ax.axhline(
                pts["y"].mean(), color=method_color(method), linestyle="--", linewidth=1, alpha=0.6
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(
        "total rank (sum of r over the recurrent matrices W, U)\n"
        "point labels: ranks r_W/r_U (per layer), recurrent parameters (K)"
    )
    ax.set_title(title)
    return fig


@styled
def plot_sparsity_trajectory(metrics: pd.DataFrame, title: str = "Training") -> Figure:
    """Overall sparsity (with the controller's target when logged) and validation accuracy per
    epoch, one line per run (``analysis.metrics`` rows)."""
    fig, axes = new_figure(1, 2, (11, 4.2), sharex=True)
    for run, st in _run_styles(metrics).items():
        rows = metrics[metrics["run"] == run]
        kw = {"color": st["color"], "linestyle": st["linestyle"], "marker": "o", "markersize": 3}
        axes[0].plot(rows["epoch"], rows["sparsity"], label=st["label"], **kw)
        if "target_sparsity" in rows and rows["target_sparsity"].notna().any():
            axes[0].plot(
                rows["epoch"],
                rows["target_sparsity"],
                color=st["color"],
                linestyle=":",
                linewidth=1,
                label="target" if st["first"] else None,
            )
        axes[1].plot(rows["epoch"], rows["val_acc"], **kw)
    for ax, what in zip(axes, ("overall sparsity (% of weights zero)", "validation accuracy (%)")):
        percent_axis(ax.yaxis)
        ax.set_ylabel(what)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylim(bottom=0)
    axes[0].legend(loc="best")
    fig.suptitle(title)
    return fig


CONTROLLER_UNITS = {
    "sparsity": "overall sparsity",
    "macs": "sparse / dense MACs",
    "params": "parameters",
    "rank": "sum of learned ranks",
}


def controller_metric(metrics: pd.DataFrame) -> str | None:
    """The budget metric a run's controller steered (its ``target_<metric>`` column), if any."""
    for metric in CONTROLLER_UNITS:
        if f"target_{metric}" in metrics and f"achieved_{metric}" in metrics:
            return metric
    return None


def _decay_panel(ax: Axes, rows: pd.DataFrame, color: str) -> None:
    """The controller's right panel: the steered decays (log) and the summed shift of s."""
    what = {"threshold": "decay on the thresholds s", "spectrum": "decay on singular values"}
    roles = [r for r in what if f"{r}_decay" in rows]
    for role, marker in zip(roles, "os"):
        ax.plot(
            rows["epoch"],
            rows[f"{role}_decay"],
            color=color,
            marker=marker,
            markersize=3,
            linestyle="-" if marker == "o" else "--",
            label=what[role],
        )
    if roles:
        ax.set_yscale("log")
    ax.set_ylabel("steered weight decay")
    if "threshold_shift" in rows:
        twin = ax.twinx()
        twin.step(
            rows["epoch"],
            rows["threshold_shift"],
            where="post",
            color="#d62728",
            linewidth=1.2,
            label="summed shift of s",
        )
        twin.set_ylabel("summed shift of s", color="#d62728")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")


@styled
def plot_controller(metrics: pd.DataFrame, title: str = "Budget controller") -> Figure:
    """One run's budget controller per epoch (metrics.csv rows): target vs achieved total in the
    metric's unit (left), the weight decay it steered (on the thresholds or on singular values)
    and the summed threshold shift (right). Before the controller takes over the target is
    empty (plain STR)."""
    metric = controller_metric(metrics)
    if metric is None:
        raise ValueError("plot_controller: no target_<metric> / achieved_<metric> columns")
    rows = metrics.sort_values("epoch")
    fig, axes = new_figure(1, 2, (11, 4.2), sharex=True)
    color = method_color("str")
    axes[0].plot(
        rows["epoch"],
        rows[f"achieved_{metric}"],
        color=color,
        marker="o",
        markersize=3,
        label="achieved",
    )
    axes[0].plot(
        rows["epoch"],
        rows[f"target_{metric}"],
        color="black",
        linestyle=":",
        marker="x",
        markersize=4,
        label="target (schedule)",
    )
    final = rows[f"target_{metric}"].dropna()
    if len(final):
        axes[0].axhline(final.iloc[-1], color="#8c8c8c", linewidth=0.8)
    if metric in ("sparsity", "macs"):
        percent_axis(axes[0].yaxis)
    axes[0].set_ylabel(CONTROLLER_UNITS[metric])
    axes[0].legend(loc="best")
    _decay_panel(axes[1], rows, color)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig


def _per_layer_lines(ax: Axes, history: pd.DataFrame, column: str) -> int:
    """One line per layer of ``column`` over epochs, colored by depth; legend or colorbar."""
    known = history.groupby("name", sort=False)[column].apply(lambda v: v.notna().any())
    names = [n for n in layer_order(history) if known[n]]
    norm = Normalize(0, max(len(names) - 1, 1))
    cmap = colormaps["viridis"]
    for i, name in enumerate(names):
        rows = history[history["name"] == name].sort_values("epoch")
        ax.plot(
            rows["epoch"],
            rows[column],
            color=cmap(norm(i)),
            label=name,
            linewidth=1.4,
            marker="o",
            markersize=2.5,
        )
    if 0 < len(names) <= MAX_LEGEND:
        ax.legend(fontsize=8, loc="best", ncols=2 if len(names) > 6 else 1)
    elif names:
        bar = ax.figure.colorbar(ScalarMappable(norm, cmap), ax=ax)
        bar.set_label(f"layer (0 = {names[0]}, {len(names) - 1} = {names[-1]})")
        bar.locator = MaxNLocator(integer=True)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return len(names)


@styled
def plot_threshold_trajectory(history: pd.DataFrame, title: str = "Thresholds") -> Figure:
    """Per-layer threshold g(s) over epochs of one run (``budget_history.csv`` rows); log scale
    when the thresholds span more than two decades (zeros, i.e. not yet pruning, left out)."""
    fig, (ax,) = new_figure(size=(7.5, 4.4))
    values = history["threshold"].where(history["threshold"] > 0)
    _per_layer_lines(ax, history.assign(threshold=values), "threshold")
    positive = values.dropna()
    if len(positive) and positive.max() > 100 * positive.min():
        ax.set_yscale("log")
    ax.set_ylabel("threshold g(s) (weight units; sigma units for low rank)")
    ax.set_title(title)
    return fig


@styled
def plot_rank_trajectory(history: pd.DataFrame, title: str = "Learned ranks") -> Figure:
    """Rank of each low-rank matrix over epochs of one run (``budget_history.csv`` rows)."""
    fig, (ax,) = new_figure(size=(7.5, 4.4))
    _per_layer_lines(ax, history, "rank")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("rank (nonzero thresholded singular values)")
    ax.set_title(title)
    return fig


@styled
def plot_spectra(spectra: pd.DataFrame, title: str = "Singular values") -> Figure:
    """One panel per recurrent matrix of one run: singular values at init (grey) and at the end
    (color), thresholds dotted; the title gives the kept rank (sigma > threshold) of k."""
    keys = list(dict.fromkeys(zip(spectra["layer"], spectra["matrix"])))
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = new_figure(nrows, ncols, (3.6 * ncols + 0.6, 3.0 * nrows + 0.8))
    colors = {"init": "#8c8c8c", "final": method_color("str")}
    for ax, (layer, matrix) in zip(axes, keys):
        part = spectra[(spectra["layer"] == layer) & (spectra["matrix"] == matrix)]
        kept = ""
        for stage, rows in part.groupby("stage", sort=False):
            rows = rows.sort_values("index")
            color = colors.get(str(stage), "black")
            sigma = rows["sigma"].where(rows["sigma"] > 0)
            ax.plot(
                rows["index"],
                sigma,
                color=color,
                label=str(stage),
                marker=".",
                markersize=3,
                linewidth=1.2,
            )
            thr = rows["threshold"].dropna()
            if len(thr):
                ax.axhline(
                    thr.iloc[0],
                    color=color,
                    linestyle=":",
                    linewidth=1.2,
                    label=f"{stage} threshold",
                )
            if stage == "final":
                t = thr.iloc[0] if len(thr) else 0.0
                kept = f": rank {int((rows['sigma'] > t).sum())} of {len(rows)}"
        if (part["sigma"] > 0).any():
            ax.set_yscale("log")
        ax.set_title(f"{layer} {matrix}{kept}", fontsize=10)
        ax.set_xlabel("index i (descending)")
        ax.set_ylabel(r"singular value $\sigma_i$")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def run_figures(run: Run) -> dict[str, Figure]:
    """The single-run figures that apply to ``run``, by file stem."""
    figs: dict[str, Figure] = {}
    name = f"{run.label} ({run.method})"
    if len(name) > 60:  # titles get their own lines: "Per-layer budget:\n<long run name>"
        name = "\n" + wrapped(name, 60)
    budget = analysis.budgets([run])
    if budget is not None:
        figs["budget"] = plot_layer_budget(budget, f"Per-layer budget: {name}")
    table = analysis.metrics([run])
    if table is not None:
        figs["training"] = plot_sparsity_trajectory(table, f"Training: {name}")
        if controller_metric(table) is not None:
            figs["controller"] = plot_controller(table, f"Budget controller: {name}")
    history = analysis.histories([run])
    if history is not None and history["threshold"].gt(0).any():
        figs["thresholds"] = plot_threshold_trajectory(history, f"Thresholds g(s): {name}")
    if history is not None and "rank" in history and history["rank"].notna().any():
        figs["ranks"] = plot_rank_trajectory(history, f"Learned ranks: {name}")
    if run.spectra is not None:
        figs["spectra"] = plot_spectra(run.spectra, f"Singular values: {name}")
    return figs


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the applicable single-run figures of ``run_dir`` as run_dir/plots/*.png."""
    run = analysis.load_run(run_dir)
    return [
        save_figure(fig, run.path / "plots" / f"{stem}.png")
        for stem, fig in run_figures(run).items()
    ]
