"""Per-layer budgets: the one implementation of nnz, sparsity, rank, parameters and MACs.

Conventions (docs/METHOD.md section 3, confirmed by the STR authors):
- sparsity and parameters are counted over conv and linear weights (and low-rank matrices);
  BN, biases and thresholds are not counted;
- MACs of a conv/linear layer: dense MACs x density of its effective weight; a low-rank matrix
  reports its own MACs through ``budget_entries`` (T x r (out + in) instead of T x out x in).
MACs are per example and need one forward pass (``example_input``); without it they are NaN.
- a model with group (channel) thresholds (strlowrank.method.group_threshold) is counted as the
  physically smaller network it exports to (strlowrank.method.channel_groups): every conv and linear
  layer has ``channels`` of its ``channels_dense`` outputs and the inputs its producers keep,
  nnz is that layer's parameter count and MACs scale with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from strlowrank.method.channel_groups import kept_channels
from strlowrank.method.group_threshold import ChannelGate, GroupSoftThreshold, model_coupling
from strlowrank.method.threshold import SoftThreshold, select_modules, weight_parametrizations

COLUMNS = [
    "name",
    "kind",
    "param",
    "shape",
    "numel",
    "nnz",
    "sparsity",
    "threshold",
    "rank",
    "full_rank",
    "macs_dense",
    "macs_sparse",
    "channels",
    "channels_dense",
]


def _layer_macs(module: nn.Module, out: torch.Tensor, batch: int) -> float:
    """Dense multiply-accumulates per example of a conv or linear layer for output ``out``."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return out.numel() / batch * w.shape[1]
    # conv: every output element costs (C_in / groups) * prod(kernel) MACs
    return out.numel() / batch * (w.shape[1] * math.prod(w.shape[2:]))


def _method(module: nn.Module) -> tuple[str, float]:
    """('str' | 'mask' | 'dense', mean threshold g(s) or NaN) of a conv/linear module."""
    param, thr = "dense", float("nan")
    for name, _, p in weight_parametrizations(module):
        if name:
            continue
        if isinstance(p, SoftThreshold):
            param, thr = "str", float(p.threshold().mean())
        elif isinstance(p, (GroupSoftThreshold, ChannelGate)):  # channel threshold or its gate
            param, thr = "group", float(p.threshold())
        else:
            param = "mask"
    return param, thr


def _trace(model: nn.Module, example_input, targets: list[nn.Module]) -> dict[int, tuple]:
    """Run one forward and record (inputs, output) of each target module."""
    seen: dict[int, tuple] = {}

    def record(mod: nn.Module, inputs: tuple, output) -> None:
        seen.setdefault(id(mod), (inputs, output))  # first call only (shared modules)

    hooks = [m.register_forward_hook(record) for m in targets]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            inputs = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def budget_table(
    model: nn.Module,
    example_input: torch.Tensor | tuple | None = None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per conv/linear weight and per low-rank matrix, in network order, plus 'total'.

    Columns: name, kind (conv2d, linear, gru.W, ...), param (str, group, mask, dense, lowrank,
    full), shape, numel, nnz, sparsity, threshold (g(s) or NaN), rank, full_rank (low-rank
    matrices), macs_dense, macs_sparse (per example; NaN without ``example_input``), channels,
    channels_dense (output channels kept of all; models with group thresholds only).
    """
    owners = [(n, m) for n, m in model.named_modules() if hasattr(m, "budget_entries")]
    inside = tuple(n + "." for n, _ in owners)
    selected = select_modules(model, include, exclude)  # conv / linear modules by name pattern
    layers = [(n, m) for n, m in selected if not n.startswith(inside)]
    batch = 1
    traced: dict[int, tuple] = {}
    if example_input is not None:
        first = example_input[0] if isinstance(example_input, tuple) else example_input
        batch = first.shape[0]
        traced = _trace(model, example_input, [m for _, m in layers + owners])
    rows = []
    coupling = model_coupling(model)
    kept = kept_channels(model, coupling) if coupling is not None else {}
    with torch.no_grad():
        for name, module in layers:
            dense = (
                _layer_macs(module, traced[id(module)][1], batch)
                if id(module) in traced
                else (float("nan"))
            )
            rows.append(_layer_row(name, module, dense, kept.get(name)))
        for name, module in owners:
            inputs = traced.get(id(module), (None,))[0]
            for entry in module.budget_entries(inputs):
                row = {c: float("nan") for c in COLUMNS} | dict(entry)
                row["name"] = f"{name}.{entry['name']}" if name else entry["name"]
                rows.append(row)  # entries report MACs per example (per sequence)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda r: _position(order, r["name"]))
    table = pd.DataFrame(rows, columns=COLUMNS)
    return pd.concat([table, _total(table)], ignore_index=True)


def _layer_row(name: str, module: nn.Module, dense: float, kept: tuple[int, int] | None) -> dict:
    """The budget row of a conv/linear layer (``kept``: the (output, input) channels that the
    smaller network keeps, for a model with group thresholds)."""
    w = module.weight
    numel, nnz = w.numel(), int(torch.count_nonzero(w))
    if kept is not None:  # the smaller network's layer: its parameter count
        nnz = _kept_params(module, *kept)
    param, thr = _method(module)
    return {
        "name": name,
        "kind": type(module).__name__.lower(),
        "param": param,
        "shape": "x".join(map(str, w.shape)),
        "numel": numel,
        "nnz": nnz,
        "sparsity": 1.0 - nnz / numel,
        "threshold": thr,
        "rank": float("nan"),
        "full_rank": float("nan"),
        "macs_dense": dense,
        "macs_sparse": dense * nnz / numel,
        "channels": kept[0] if kept is not None else float("nan"),
        "channels_dense": w.shape[0] if kept is not None else float("nan"),
    }


def _kept_params(module: nn.Module, out_kept: int, in_kept: int) -> int:
    """Weight entries of a conv/linear layer cut to ``out_kept`` outputs and ``in_kept`` inputs
    (a depthwise conv: one input per output)."""
    w = module.weight
    per_out = w.numel() // w.shape[0]
    groups = getattr(module, "groups", 1)
    if groups > 1:  # depthwise (grouped convs keep their inputs per group)
        return out_kept * per_out
    return out_kept * (per_out // w.shape[1]) * in_kept


def _position(order: dict[str, int], name: str) -> int:
    """Network (registration) order of a row's module, so tables and plots follow the model."""
    while name and name not in order:
        name = name.rpartition(".")[0]
    return order.get(name, len(order))


def _total(table: pd.DataFrame) -> pd.DataFrame:
    numel, nnz = int(table["numel"].sum()), int(table["nnz"].sum())
    return pd.DataFrame(
        [
            {
                "name": "total",
                "kind": "total",
                "param": "",
                "shape": "",
                "numel": numel,
                "nnz": nnz,
                "sparsity": 1.0 - nnz / max(numel, 1),
                "threshold": float("nan"),
                "rank": float("nan"),
                "full_rank": float("nan"),
                "macs_dense": table["macs_dense"].sum(min_count=1),
                "macs_sparse": table["macs_sparse"].sum(min_count=1),
                "channels": table["channels"].sum(min_count=1),
                "channels_dense": table["channels_dense"].sum(min_count=1),
            }
        ],
        columns=COLUMNS,
    )


def _is_total(table: pd.DataFrame) -> pd.Series:
    """True on the 'total' row of a budget table (its name, in any case and with surrounding
    spaces, so that hand-edited budget.csv files are read the same way)."""
    return table["name"].astype(str).str.strip().str.lower() == "total"


def layers(table: pd.DataFrame) -> pd.DataFrame:
    """The per-layer rows of a budget table (without 'total'), from budget_table or budget.csv."""
    return table[~_is_total(table)]


def ranked_layers(table: pd.DataFrame) -> pd.DataFrame:
    """The per-layer rows that have a rank: the low-rank matrices."""
    rows = layers(table)
    return rows[rows["rank"].notna()]


def matrix_params(table: pd.DataFrame) -> int:
    """Parameters the low-rank matrices store (a recurrent cell's W and U, no biases): the sum
    of their nnz, each matrix's factors or, where smaller, its dense form (``num_params``)."""
    return int(ranked_layers(table)["nnz"].sum())


def totals(table: pd.DataFrame) -> dict[str, float]:
    """The 'total' row as a dict: numel, nnz, sparsity, macs_dense, macs_sparse."""
    row = table[_is_total(table)].iloc[0]
    return {k: float(row[k]) for k in ("numel", "nnz", "sparsity", "macs_dense", "macs_sparse")}


def dead_layers(table: pd.DataFrame) -> list[str]:
    """Names of layers whose effective weight is entirely zero (100% sparsity, or rank 0)."""
    rows = layers(table)
    return list(rows.loc[rows["nnz"] == 0, "name"])
