"""Budget measures: the total a budget target counts, as a fraction that rises with the thresholds.

A measure maps a model to y = 1 - sum(kept) / sum(full) over the per-layer rows of
:func:`strlowrank.method.budget.budget_table` (the one implementation of the counts):

    sparsity   1 - nnz / numel                  (low-rank matrices: nnz = their factors' params)
    macs       1 - macs_sparse / macs_dense     (one forward of an example input)
    params     1 - nnz / numel                  (the same measure; the target is a count)
    rank       1 - sum(rank) / sum(full_rank)   (low-rank matrices only)

y is non-decreasing in every threshold, which the budget controller (strlowrank.training.controller)
and the exact threshold shift (strlowrank.training.threshold_shift) rely on. A target in user units
(a fraction, a parameter count, a sum of ranks) is converted to y by :func:`to_reduction`, with the
model's full size from :func:`unit_scale`. docs/CONTROLLER.md. :func:`budget_warnings` reads the
same rows at the end of a run and names a budget that was not learned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from strlowrank.method.budget import budget_table, layers, ranked_layers
from strlowrank.training.train_config import TrainConfig

METRICS = ("sparsity", "macs", "params", "rank")
Measure = Callable[[nn.Module], float]


def budget_metric(
    kept: str = "nnz",
    full: str = "numel",
    example_input: torch.Tensor | tuple | None = None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    rank_rows: bool = False,
) -> Measure:
    """A measure 1 - sum(kept) / sum(full) over the per-layer rows of :func:`budget_table`.

    ``rank_rows`` keeps only rows with a rank (low-rank matrices). ``example_input`` is needed
    only for the MAC columns; it is moved to the model's device at each call.
    """

    def measure(model: nn.Module) -> float:
        ex = example_input
        if isinstance(ex, torch.Tensor):
            ex = ex.to(next(model.parameters()).device)
        table = budget_table(model, ex, include, exclude)
        rows = ranked_layers(table) if rank_rows else layers(table)
        total = float(rows[full].sum())
        return 1.0 - float(rows[kept].sum()) / total if total > 0 else 0.0

    return measure


def sparsity_metric(include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> Measure:
    """Total sparsity 1 - nnz / numel (the budget table's 'total' sparsity). For low-rank
    matrices nnz is the parameter count of the compact factors, so this is also 1 - params / dense
    params."""
    return budget_metric("nnz", "numel", None, include, exclude)


def macs_metric(
    example_input: torch.Tensor | tuple,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> Measure:
    """MAC reduction 1 - macs_sparse / macs_dense (one forward of ``example_input`` per call)."""
    return budget_metric("macs_sparse", "macs_dense", example_input, include, exclude)


def rank_metric(include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> Measure:
    """Rank reduction 1 - sum(rank) / sum(full_rank) over the low-rank matrices."""
    return budget_metric("rank", "full_rank", None, include, exclude, rank_rows=True)


def make_measure(
    metric: str, example_input=None, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> Measure:
    """The measure of ``metric`` (one of :data:`METRICS`); params is total sparsity."""
    if metric in ("sparsity", "params"):
        return sparsity_metric(include, exclude)
    if metric == "macs":
        if example_input is None:
            raise ValueError("the macs target needs an example input (Task.example_input)")
        return macs_metric(example_input, include, exclude)
    if metric == "rank":
        return rank_metric(include, exclude)
    raise ValueError(f"unknown budget metric {metric!r} ({', '.join(METRICS)})")


def unit_scale(
    metric: str, model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> float:
    """The metric's full size in user units: 1 (sparsity, macs), dense parameters, full ranks."""
    if metric in ("sparsity", "macs"):
        return 1.0
    rows = layers(budget_table(model, None, include, exclude))
    if metric == "params":
        return float(rows["numel"].sum())
    if metric == "rank":
        full = float(rows["full_rank"].sum())
        if not full > 0:
            raise ValueError("the rank target needs low-rank matrices in the model")
        return full
    raise ValueError(f"unknown budget metric {metric!r} ({', '.join(METRICS)})")


def to_reduction(metric: str, value: float, scale: float = 1.0) -> float:
    """A target in user units -> the measure's unit (a fraction that rises with s).

    sparsity: the fraction itself; macs: 1 - sparse/dense MACs (both fractions in (0, 1));
    params, rank: 1 - value / scale (scale from :func:`unit_scale`).
    """
    if metric in ("sparsity", "macs") and not 0.0 < value < 1.0:
        raise ValueError(
            f"controller.target: a {metric} target is a fraction in (0, 1), got {value:g}"
        )
    if metric in ("params", "rank") and not 0.0 < value < scale:
        raise ValueError(
            f"controller.target: {value:g} {metric} is not below the model's {scale:g}"
        )
    return value if metric == "sparsity" else 1.0 - value / scale


def from_reduction(metric: str, reduction: float, scale: float = 1.0) -> float:
    """The inverse of :func:`to_reduction` (for logging in user units)."""
    return reduction if metric == "sparsity" else scale * (1.0 - reduction)


def collapse_accuracy(classes: int) -> float:
    """The accuracy under which a model counts as collapsed: twice chance, 2 / C, or halfway
    from chance to perfect, (1 + 1 / C) / 2, whichever is lower (75% for two classes, where
    twice chance would be 100%)."""
    return min(2.0 / classes, (1.0 + 1.0 / classes) / 2.0)


def budget_warnings(
    table: pd.DataFrame, val_acc: float, classes: int, cfg: TrainConfig, steps: int
) -> list[str]:
    """One line per way a learned budget failed silently: STR layers that pruned almost nothing
    (total sparsity of the thresholded layers under 10%, or learned ranks summing to over 80% of
    the full ranks) or accuracy collapsed (val accuracy under `collapse_accuracy`). Empty for
    methods without STR."""
    rows = layers(table)
    learned = rows[rows["param"].isin(("str", "group"))]  # weight or channel thresholds
    if not len(learned):
        return []
    ranked = "rank" in learned and learned["rank"].notna().all()
    notes = []
    if ranked and learned["rank"].sum() > 0.8 * learned["full_rank"].sum():
        pairs = zip(learned["name"], learned["rank"], learned["full_rank"])
        ranks = ", ".join(f"{n.rsplit('.', 1)[-1]} {int(r)}/{int(f)}" for n, r, f in pairs)
        notes.append(
            f"warning: no rank was learned (ranks {ranks} after {steps} optimizer steps, "
            f"together over 80% of full): ask for a budget with --target-params N or "
            f"--target-rank N, or raise train.spectrum_decay (now {cfg.spectrum_decay})"
        )
    sparsity = 1.0 - learned["nnz"].sum() / max(learned["numel"].sum(), 1)
    if not ranked and sparsity < 0.1:
        notes.append(
            f"warning: STR pruned almost nothing ({100 * sparsity:.1f}% sparsity after "
            f"{steps} optimizer steps): ask for a budget with --target-sparsity 0.9 or "
            f"--target-macs 0.1, or raise train.threshold_decay (now "
            f"{cfg.threshold_decay})"
        )
    floor = collapse_accuracy(classes)
    if classes > 1 and val_acc < floor:
        notes.append(
            f"warning: val accuracy {100 * val_acc:.1f}% is below {100 * floor:.1f}% "
            f"(a collapsed model) at {100 * sparsity:.1f}% sparsity of the learned "
            f"layers: the budget is too small; ask for a larger one (--target-sparsity, "
            f"--target-params) or lower the decay"
        )
    return notes
