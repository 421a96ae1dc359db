"""budget_table: exact nnz, sparsity and MACs on a hand-built model."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from strlowrank import apply_soft_threshold
from strlowrank.method.budget import budget_table, dead_layers, layers, ranked_layers, totals


def hand_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),  # 8x8 out: 4*8*8 * 2*9 MACs
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False),  # 4x4 out: 4*16 * 2*9
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(72, dtype=torch.float).view(4, 2, 3, 3) / 100)
    return model


def test_dense_counts_and_macs():
    table = budget_table(hand_model(), torch.zeros(3, 2, 8, 8))
    rows = table.set_index("name")
    assert list(table["name"]) == ["0", "2", "4", "total"]
    assert rows.loc["0", "numel"] == 72 and rows.loc["0", "nnz"] == 71  # one weight is 0.0
    assert rows.loc["0", "macs_dense"] == 4 * 8 * 8 * 2 * 9
    assert rows.loc["2", "macs_dense"] == 4 * 4 * 4 * 2 * 9
    assert rows.loc["4", "macs_dense"] == 64 * 5
    total = totals(table)
    assert total["numel"] == 72 + 72 + 320
    assert total["macs_dense"] == 4608 + 1152 + 320


def test_total_row_is_found_the_same_way_in_tables_and_read_csv_files(tmp_path):
    table = budget_table(hand_model(), torch.zeros(1, 2, 8, 8))
    assert list(layers(table)["name"]) == ["0", "2", "4"]
    assert ranked_layers(table).empty  # no low-rank matrices here
    path = tmp_path / "budget.csv"
    table.assign(name=[*table["name"][:-1], " Total "]).to_csv(path, index=False)
    edited = pd.read_csv(path)  # names read back as strings; a hand-edited total row
    assert list(layers(edited)["name"]) == ["0", "2", "4"]
    assert totals(edited) == totals(table)


def test_thresholded_counts_follow_effective_weight():
    model = hand_model()
    apply_soft_threshold(model, include=("0",), s_init=float(torch.logit(torch.tensor(0.305))))
    table = budget_table(model, torch.zeros(1, 2, 8, 8)).set_index("name")
    # weights are k/100 for k = 0..71; those with k/100 > 0.305 survive: k = 31..71
    assert table.loc["0", "nnz"] == 41
    assert table.loc["0", "param"] == "str" and table.loc["2", "param"] == "dense"
    assert math.isclose(table.loc["0", "threshold"], 0.305, rel_tol=1e-5)
    assert table.loc["0", "sparsity"] == pytest.approx(1 - 41 / 72)
    assert table.loc["0", "macs_sparse"] == pytest.approx(4608 * 41 / 72)
    assert math.isnan(table.loc["2", "threshold"])


def test_without_input_macs_are_nan_and_dead_layers():
    model = hand_model()
    with torch.no_grad():
        model[2].weight.zero_()
    table = budget_table(model)
    assert table["macs_dense"].isna().all()
    assert dead_layers(table) == ["2"]


class Factored(nn.Module):
    """A module reporting its own budget rows, like the low-rank RNN layers."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return self.proj(x)

    def budget_entries(self, inputs):
        t = inputs[0].shape[1] if inputs is not None else float("nan")
        return [
            {
                "name": "W",
                "kind": "lowrank",
                "param": "str",
                "numel": 36,
                "nnz": 24,
                "sparsity": 1 - 24 / 36,
                "rank": 2,
                "full_rank": 6,
                "macs_dense": t * 36,
                "macs_sparse": t * 24,
            }
        ]


def test_budget_entries_protocol():
    model = nn.Sequential(Factored(), nn.Linear(6, 3))
    table = budget_table(model, torch.zeros(4, 10, 6)).set_index("name")
    assert "0.proj" not in table.index  # owned by the factored module
    assert table.loc["0.W", "rank"] == 2 and table.loc["0.W", "macs_dense"] == 10 * 36
    assert table.loc["total", "nnz"] == 24 + 18
