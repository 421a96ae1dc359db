"""strlowrank.analysis and strlowrank.analysis.plotting on small fake run folders written here.

``write_run`` writes the run-folder contract (config.yaml, metrics.csv, budget.csv,
budget_history.csv, summary.json, spectra.csv for speech) without training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure

from strlowrank import analysis
from strlowrank.analysis import plotting

VISION_LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]
SPEECH_MATRICES = {"rnn.0.W": (96, 32), "rnn.0.U": (96, 32)}


def _vision_budget(sparsity: float, method: str) -> list[dict]:
    rows = []
    for i, name in enumerate(VISION_LAYERS):
        numel = 1000 * (i + 1)
        s = 0.0 if method == "dense" else min(0.99, sparsity * (0.6 + 0.2 * i))
        thr = 0.01 * (i + 1) if method == "str" else float("nan")
        rows.append(
            {
                "name": name,
                "kind": "conv2d",
                "param": "str" if method == "str" else "mask",
                "shape": "x",
                "numel": numel,
                "nnz": round(numel * (1 - s)),
                "sparsity": s,
                "threshold": thr,
                "rank": np.nan,
                "full_rank": np.nan,
                "macs_dense": 1e5 * numel,
                "macs_sparse": 1e5 * numel * (1 - s),
            }
        )
    return rows


def _speech_budget(ranks: dict[str, int], method: str) -> list[dict]:
    rows = []
    for name, (out_f, in_f) in SPEECH_MATRICES.items():
        r = ranks[name]
        nnz = out_f * in_f if method == "full" else r * (out_f + in_f)
        rows.append(
            {
                "name": name,
                "kind": "gru." + name[-1],
                "param": method,
                "shape": f"{out_f}x{in_f}",
                "numel": out_f * in_f,
                "nnz": nnz,
                "sparsity": 1 - nnz / (out_f * in_f),
                "threshold": 0.3 if method == "str" else np.nan,
                "rank": r,
                "full_rank": 32,
                "macs_dense": 99.0 * out_f * in_f,
                "macs_sparse": 99.0 * nnz,
            }
        )
    rows.append(
        {
            "name": "fc",
            "kind": "linear",
            "param": "dense",
            "shape": "12x32",
            "numel": 384,
            "nnz": 384,
            "sparsity": 0.0,
            "threshold": np.nan,
            "rank": np.nan,
            "full_rank": np.nan,
            "macs_dense": 384.0,
            "macs_sparse": 384.0,
        }
    )
    return rows


def _total(rows: list[dict]) -> dict:
    numel, nnz = sum(r["numel"] for r in rows), sum(r["nnz"] for r in rows)
    return {
        "name": "total",
        "kind": "total",
        "param": "",
        "shape": "",
        "numel": numel,
        "nnz": nnz,
        "sparsity": 1 - nnz / numel,
        "threshold": np.nan,
        "rank": np.nan,
        "full_rank": np.nan,
        "macs_dense": sum(r["macs_dense"] for r in rows),
        "macs_sparse": sum(r["macs_sparse"] for r in rows),
    }


def _spectra(ranks: dict[str, int], method: str) -> pd.DataFrame:
    rows = []
    for name, r in ranks.items():
        layer, matrix = name.rsplit(".", 1)
        for stage in ("init", "final"):
            sigma = np.linspace(2.0, 0.05, 32) * (1.0 if stage == "init" else 1.5)
            thr = float(sigma[r]) + 1e-3 if (method == "str" and stage == "final") else np.nan
            rows += [
                {
                    "layer": layer,
                    "matrix": matrix,
                    "stage": stage,
                    "index": i,
                    "sigma": s,
                    "threshold": thr,
                }
                for i, s in enumerate(sigma)
            ]
    return pd.DataFrame(rows)


def write_run(
    path: Path,
    track: str = "vision",
    method: str = "str",
    sparsity: float = 0.5,
    acc: float = 0.8,
    epochs: int = 3,
    seed: int = 0,
    lam: float = 1e-4,
    ranks: dict[str, int] | None = None,
) -> Path:
    """A complete fake run folder (the engine's and entry scripts' files)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "out": str(path),
        "train": {"seed": seed, "threshold_decay": lam},
        "model": {"method": method, "ranks": ranks, "sparsity": sparsity},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    if track == "vision":
        rows = _vision_budget(sparsity, method)
    else:
        ranks = ranks or {"rnn.0.W": 8, "rnn.0.U": 12}
        rows = _speech_budget(ranks, method)
        _spectra(ranks, method).to_csv(path / "spectra.csv", index=False)
    total = _total(rows)
    pd.DataFrame([*rows, total]).to_csv(path / "budget.csv", index=False)
    epoch = np.arange(1, epochs + 1)
    pd.DataFrame(
        {
            "epoch": epoch,
            "step": epoch * 10,
            "lr": 0.1,
            "train_loss": 1 / epoch,
            "train_acc": acc * epoch / epochs,
            "val_loss": 1 / epoch,
            "val_acc": acc * epoch / epochs,
            "val_top5": 1.0,
            "sparsity": total["sparsity"] * epoch / epochs,
            "nnz": total["nnz"],
            "macs_sparse": total["macs_sparse"],
        }
    ).to_csv(path / "metrics.csv", index=False)
    history = [
        {
            "epoch": e,
            "name": r["name"],
            "nnz": r["nnz"],
            "sparsity": r["sparsity"] * e / epochs,
            "threshold": r["threshold"] * e,
            "rank": r["rank"],
        }
        for e in epoch
        for r in rows
    ]
    pd.DataFrame(history).to_csv(path / "budget_history.csv", index=False)
    summary = {
        "epochs": epochs,
        "numel": total["numel"],
        "nnz": total["nnz"],
        "sparsity": total["sparsity"],
        "macs_dense": total["macs_dense"],
        "macs_sparse": total["macs_sparse"],
        "val_acc": acc,
        "val_top5": 1.0,
        "val_loss": 0.5,
        "train_time_s": 1.0,
        "track": track,
        "method": method,
    }
    if track == "speech":
        summary |= {"params": sum(r["nnz"] for r in rows[:2]), "ranks": ranks}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture()
def vision_runs(tmp_path: Path) -> list[analysis.Run]:
    tmp_path = tmp_path / "vision"
    write_run(tmp_path / "str_a", method="str", sparsity=0.5, acc=0.80, lam=1e-4)
    write_run(tmp_path / "str_b", method="str", sparsity=0.8, acc=0.70, lam=3e-4)
    write_run(tmp_path / "str_b_s1", method="str", sparsity=0.8, acc=0.72, lam=3e-4, seed=1)
    write_run(tmp_path / "gmp_a", method="gmp", sparsity=0.5, acc=0.78)
    write_run(tmp_path / "dense", method="dense", sparsity=0.0, acc=0.85)
    return analysis.load_runs([tmp_path])


@pytest.fixture()
def speech_runs(tmp_path: Path) -> list[analysis.Run]:
    tmp_path = tmp_path / "speech"
    write_run(tmp_path / "full", "speech", "full", acc=0.9, ranks={"rnn.0.W": 32, "rnn.0.U": 32})
    write_run(tmp_path / "lr8", "speech", "lowrank", acc=0.8, ranks={"rnn.0.W": 8, "rnn.0.U": 8})
    write_run(
        tmp_path / "lr16", "speech", "lowrank", acc=0.85, ranks={"rnn.0.W": 16, "rnn.0.U": 16}
    )
    write_run(tmp_path / "str", "speech", "str", acc=0.86, ranks={"rnn.0.W": 10, "rnn.0.U": 14})
    return analysis.load_runs([tmp_path])


def test_load_runs_combines_tables(vision_runs):
    table = analysis.summaries(vision_runs)
    assert len(table) == 5 and set(table["method"]) == {"str", "gmp", "dense"}
    assert (table["track"] == "vision").all() and table["accuracy"].notna().all()
    # seeds of one config share a group; other configs do not
    groups = dict(zip(table["run"], table["group"]))
    assert groups["str_b"] == groups["str_b_s1"] != groups["str_a"]
    budget = analysis.budgets(vision_runs)
    assert len(budget) == 5 * len(VISION_LAYERS) and "total" not in set(budget["name"])
    assert analysis.layer_order(budget) == VISION_LAYERS
    assert len(analysis.metrics(vision_runs)) == 5 * 3
    assert len(analysis.histories(vision_runs)) == 5 * 3 * len(VISION_LAYERS)
    assert analysis.spectra(vision_runs) is None


def test_speech_summary_flattens_ranks(speech_runs):
    table = analysis.summaries(speech_runs).set_index("run")
    assert table.loc["lr8", "ranks.rnn.0.W"] == 8 and table.loc["str", "rank_total"] == 24
    assert set(table["track"]) == {"speech"}
    assert len(analysis.spectra(speech_runs)) == 4 * 2 * 2 * 32


def test_labels_are_unique_and_missing_files_are_none(tmp_path):
    write_run(tmp_path / "a" / "run")
    write_run(tmp_path / "b" / "run")
    (tmp_path / "b" / "run" / "budget_history.csv").unlink()
    runs = analysis.load_runs([tmp_path / "a", tmp_path / "b" / "run"])
    assert [r.label for r in runs] == ["a/run", "b/run"]
    assert runs[1].history is None and analysis.histories(runs) is not None
    with pytest.raises(FileNotFoundError):
        analysis.load_runs([tmp_path / "nope"])


def _labels(fig: Figure) -> list[tuple[str, str]]:
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.get_visible()]


def test_layer_budget_bars_per_run_and_layer(vision_runs):
    budget = analysis.budgets(vision_runs[:3])
    fig = plotting.plot_layer_budget(budget)
    assert isinstance(fig, Figure)
    sparsity_ax, macs_ax = fig.axes[:2]
    assert len(sparsity_ax.containers) == 3 and len(macs_ax.containers) == 3
    assert all(len(c) == len(VISION_LAYERS) for c in sparsity_ax.containers)
    assert "%" in sparsity_ax.get_xlabel() and "(M)" in macs_ax.get_xlabel()
    assert [t.get_text() for t in sparsity_ax.get_yticklabels()] == VISION_LAYERS


def test_many_layers_get_sparse_tick_labels():
    names = [f"layer{i}.conv" for i in range(130)]
    budget = pd.DataFrame(
        {
            "name": names,
            "sparsity": 0.5,
            "macs_sparse": 1e6,
            "macs_dense": 2e6,
            "run": "r",
            "method": "str",
        }
    )
    ax = plotting.plot_layer_budget(budget).axes[0]
    assert 30 <= len(ax.get_yticks()) <= 60


def test_tradeoff_plots_one_line_per_method(vision_runs, speech_runs):
    summary = analysis.summaries(vision_runs)
    for fig in (plotting.plot_sparsity_accuracy(summary), plotting.plot_macs_accuracy(summary)):
        ax = fig.axes[0]
        assert sorted(ax.get_legend_handles_labels()[1]) == ["dense", "gmp", "str"]
        assert all(x and "%" in y for x, y in _labels(fig))
    str_line = next(ln for ln in ax.lines if ln.get_label() == "str")
    assert len(str_line.get_xdata()) == 2  # two seeds of one config averaged into one point
    fig = plotting.plot_rank_accuracy(analysis.summaries(speech_runs))
    ax = fig.axes[0]
    assert sorted(ax.get_legend_handles_labels()[1]) == ["full", "lowrank", "str"]
    assert "rank" in ax.get_xlabel() and any("K" in t.get_text() for t in ax.texts)


def test_trajectories_and_spectra(vision_runs, speech_runs):
    fig = plotting.plot_sparsity_trajectory(analysis.metrics(vision_runs))
    assert len(fig.axes[0].lines) == 5 and len(fig.axes[1].lines) == 5
    assert all(x == "epoch" for x, _ in _labels(fig))
    str_a = [r for r in vision_runs if r.label == "str_a"]
    fig = plotting.plot_threshold_trajectory(analysis.histories(str_a))
    assert len(fig.axes[0].lines) == len(VISION_LAYERS) and "g(s)" in fig.axes[0].get_ylabel()
    speech = [r for r in speech_runs if r.label == "str"]
    fig = plotting.plot_rank_trajectory(analysis.histories(speech))
    assert len(fig.axes[0].lines) == 2 and "rank" in fig.axes[0].get_ylabel()
    fig = plotting.plot_spectra(speech[0].spectra)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2 and "rank 10 of 32" in panels[0].get_title()
    assert len(panels[0].lines) == 3  # init, final, final threshold


def test_plot_run_writes_applicable_pngs(tmp_path):
    vision = write_run(tmp_path / "v", method="str")
    speech = write_run(tmp_path / "s", track="speech", method="str")
    assert {p.name for p in plotting.plot_run(vision)} == {
        "budget.png",
        "training.png",
        "thresholds.png",
    }
    paths = plotting.plot_run(speech)
    assert {p.name for p in paths} == {
        "budget.png",
        "training.png",
        "thresholds.png",
        "ranks.png",
        "spectra.png",
    }
    assert all(p.parent == speech / "plots" and p.stat().st_size > 1000 for p in paths)


def test_aggregate_mean_sd_and_t_interval_by_hand():
    table = pd.DataFrame(
        {
            "point": ["a", "a", "a", "b", "c", "c"],
            "acc": [0.80, 0.84, 0.82, 0.70, 0.5, None],
            "params": [10, 10, 13, 5, 1, 1],
        }
    )
    out = analysis.aggregate(table, ["point"], "acc", extra=["params"]).set_index("point")
    a = out.loc["a"]
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.82) and a["sd"] == pytest.approx(0.02)
    # t_{0.975, 2} = 4.302653: half width 4.302653 * 0.02 / sqrt(3)
    assert a["ci"] == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-6)
    assert (a["lo"], a["hi"]) == pytest.approx((0.82 - a["ci"], 0.82 + a["ci"]))
    assert a["params"] == pytest.approx(11.0)
    assert out.loc["b", "n"] == 1 and np.isnan(out.loc["b", "ci"])  # one seed: no interval
    assert out.loc["c", "n"] == 1 and out.loc["c", "mean"] == pytest.approx(0.5)  # NaN left out
    assert list(out.index) == ["a", "b", "c"]


def test_every_figure_is_drawn_in_the_project_style():
    """Each public plot_* function (the figures, not plot_run which saves them) runs under
    plotting.style(), and no helper does."""
    import inspect

    from strlowrank.analysis import plotting

    figures = [
        f
        for name, f in inspect.getmembers(plotting, inspect.isfunction)
        if name.startswith("plot_") and name != "plot_run" and f.__module__ == plotting.__name__
    ]
    assert len(figures) >= 9
    unstyled = [f.__name__ for f in figures if not hasattr(f, "__wrapped__")]
    assert not unstyled, unstyled
    assert not hasattr(plotting.new_figure, "__wrapped__")


def test_a_long_run_name_stays_inside_its_figures(tmp_path):
    """A sweep run's folder name (about 100 characters) is wrapped in every title and legend
    entry, so no line of text is wider than its figure; short names stay on the title's line."""
    name = "name=str__granularity=structured__dense_layers=-conv1-.conv2-.downsample.-__" + "x" * 30
    figs = plotting.run_figures(analysis.load_run(write_run(tmp_path / name, method="str")))
    for fig in figs.values():
        fig.canvas.draw()
        width = fig.bbox.width
        texts = [fig._suptitle] + [t for ax in fig.axes for t in ax.texts + [ax.title]]
        texts += [t for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        texts += [t for leg in fig.legends for t in leg.get_texts()]
        for text in texts:
            if text is not None and text.get_text():
                assert text.get_window_extent().width <= width, text.get_text()
    assert "\n" not in plotting.wrapped("short") and plotting.wrapped("a" * 130).count("\n") == 1
