"""Post-training rank allocations: both rules fit the budget, on hand-computed cases and on
random spectra, and each picks what its rule says."""

import pytest
import torch

from strlowrank.method.allocation import allocation_cost, energy_ranks, greedy_ranks

SHAPES = {"A": (10, 10), "B": (10, 2)}  # A: 20 per direction below rank 5; B: 12, then dense 20


def test_cost_is_factors_or_dense_whichever_is_smaller():
    assert allocation_cost({"A": 3, "B": 1}, SHAPES) == 3 * 20 + 12
    assert allocation_cost({"A": 5, "B": 2}, SHAPES) == 100 + 20  # both stored dense


def test_greedy_takes_sigma_per_parameter_and_free_directions():
    spectra = {"A": [10, 1] + [0.5] * 8, "B": [3, 2]}
    # A's first (10 / 20) beats B's first (3 / 12); then B (0.25) beats A's second (1 / 20);
    # B's second costs only 8 more (20 dense - 12 factored) and fits 40 exactly.
    assert greedy_ranks(spectra, SHAPES, 40) == {"A": 1, "B": 2}
    assert greedy_ranks(spectra, SHAPES, 19) == {"A": 0, "B": 1}
    assert greedy_ranks(spectra, SHAPES, 10**6) == {"A": 10, "B": 2}  # past dense: free


def test_energy_keeps_one_fraction_for_every_matrix():
    spectra = {"A": [3, 2, 1] + [0] * 7, "B": [4, 3]}
    # energies: A 9, 13, 14 of 14 (f <= 0.643 needs rank 1, <= 0.929 rank 2); B 16, 25 of 25
    # (f <= 0.64 rank 1). So f in (0.64, 0.643] costs 20 + 20, (0.643, 0.929] 40 + 20 and
    # beyond 60 + 20: budget 60 stops at f = 13/14.
    ranks = energy_ranks(spectra, SHAPES, 60)
    assert ranks == {"A": 2, "B": 2} and allocation_cost(ranks, SHAPES) == 60
    assert energy_ranks(spectra, SHAPES, 51) == {"A": 1, "B": 2}
    assert energy_ranks(spectra, SHAPES, 39) == {"A": 1, "B": 1}


@pytest.mark.parametrize("rule", [energy_ranks, greedy_ranks])
def test_random_spectra_fit_every_budget_and_grow_with_it(rule):
    gen = torch.Generator().manual_seed(0)
    shapes = {"W": (384, 32), "U": (384, 128), "W_r": (128, 32)}
    spectra = {
        n: torch.rand(min(s), generator=gen).sort(descending=True).values for n, s in shapes.items()
    }
    previous = None
    for budget in (0, 500, 3000, 12000, 40000, 10**6):
        ranks = rule(spectra, shapes, budget)
        assert allocation_cost(ranks, shapes) <= budget
        if previous is not None and rule is greedy_ranks:
            assert all(ranks[n] >= previous[n] for n in ranks)
        previous = ranks
    assert previous == {n: min(s) for n, s in shapes.items()}


def test_mismatched_inputs_are_one_line():
    with pytest.raises(ValueError, match="different matrices"):
        greedy_ranks({"A": [1.0] * 10}, SHAPES, 10)
    with pytest.raises(ValueError, match="B has 3 singular values"):
        energy_ranks({"A": [1.0] * 10, "B": [1.0] * 3}, SHAPES, 10)


def test_cost_unit_thresholds_keep_what_greedy_keeps():
    """With threshold_scale "cost" and one g(s) for every matrix, STR keeps the directions with
    sigma / (out + in) above g u: the prefix of the greedy order that fits its own cost."""
    from torch import nn

    from strlowrank.method.lowrank import STRMatrix, share_threshold_unit_

    gen = torch.Generator().manual_seed(3)
    shapes = {"W": (192, 16), "U": (192, 64), "V": (64, 64)}
    mats = nn.ModuleDict(
        {
            n: STRMatrix(
                o, i, init=torch.randn(o, i, generator=gen) * (1 + k / 4), threshold_scale="cost"
            )
            for k, (n, (o, i)) in enumerate(shapes.items())
        }
    )
    unit = share_threshold_unit_(mats)
    per_param = {n: float(m.sigma.detach().max()) / sum(shapes[n]) for n, m in mats.items()}
    assert unit == pytest.approx(float(max(per_param.values())))
    for n, m in mats.items():  # one unit per parameter, scaled by a direction's cost
        assert float(m.sigma_ref) == pytest.approx(unit * sum(shapes[n]))
    spectra = {n: m.sigma.detach() for n, m in mats.items()}
    checked = 0
    for s in (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0):
        for m in mats.values():
            m.s.data.fill_(s)
        ranks = {n: m.rank() for n, m in mats.items()}
        if any(r * sum(shapes[n]) >= shapes[n][0] * shapes[n][1] for n, r in ranks.items()):
            continue  # a dense matrix's extra directions are free to greedy, not to STR
        budget = allocation_cost(ranks, shapes)
        assert sum(ranks.values()) > 0
        assert greedy_ranks(spectra, shapes, budget) == ranks
        checked += 1
    assert checked >= 4
    top = max(mats.values(), key=lambda m: float(m.sigma_ref / m.sigma.max()))
    for m in mats.values():
        m.s.data.fill_(20.0)  # g -> 1: only the matrix that sets the unit keeps its top
    assert top.rank() == 0 or float(top.sigma.max()) >= float(top.tau()) - 1e-6
    assert sum(m.rank() for m in mats.values()) <= 1
