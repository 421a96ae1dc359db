"""Rank allocations after training: how many singular directions each matrix keeps.

Given the singular values sigma_m (descending) of every matrix m of a trained model, its shape
(out_m, in_m) and a parameter budget N, each rule returns ranks r_m with

    sum_m compact_size(r_m, out_m, in_m) <= N

(`strlowrank.method.lowrank.compact_size`: r (out + in) while factors are smaller, else out in).
These are the post-training baselines a learned allocation has to beat (docs/LEARNED_RANK.md):

- `energy_ranks`: one energy fraction f for every matrix; r_m(f) is the smallest rank whose
  leading singular values hold f of the matrix's energy sum sigma^2, and f is the largest
  fraction (bisection) whose ranks fit the budget.
- `greedy_ranks`: start from rank 0 everywhere and repeatedly add the next singular direction
  of the matrix with the largest sigma per parameter it costs, while the budget allows; a
  direction that costs nothing (a matrix already stored dense) is always taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strlowrank.method.lowrank import compact_size

Spectra = Mapping[str, Sequence[float] | torch.Tensor]
Shapes = Mapping[str, tuple[int, int]]


def allocation_cost(ranks: Mapping[str, int], shapes: Shapes) -> int:
    """sum_m compact_size(r_m, out_m, in_m): the parameters the allocation stores."""
    return sum(compact_size(r, *shapes[name]) for name, r in ranks.items())


def _sorted(spectra: Spectra) -> dict[str, list[float]]:
    return {
        name: sorted((float(v) for v in torch.as_tensor(s).flatten()), reverse=True)
        for name, s in spectra.items()
    }


def _energy_rank(sigma: list[float], fraction: float) -> int:
    """The smallest r with sum_{i<r} sigma_i^2 >= fraction * sum sigma^2 (0 for fraction 0)."""
    total = sum(v * v for v in sigma)
    if fraction <= 0.0 or total <= 0.0:
        return 0
    kept = 0.0
    for r, v in enumerate(sigma, start=1):
        kept += v * v
        if kept >= fraction * total * (1 - 1e-12):
            return r
    return len(sigma)


def energy_ranks(
    spectra: Spectra, shapes: Shapes, budget: int, iterations: int = 60
) -> dict[str, int]:
    """Ranks at the largest common energy fraction that fits ``budget`` (module docstring)."""
    sigma = _sorted(spectra)
    _check(sigma, shapes, budget)

    def ranks(f: float) -> dict[str, int]:
        return {name: _energy_rank(s, f) for name, s in sigma.items()}

    if allocation_cost(ranks(1.0), shapes) <= budget:
        return ranks(1.0)
    lo, hi = 0.0, 1.0  # cost(lo) fits, cost(hi) does not
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if allocation_cost(ranks(mid), shapes) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks(lo)


def greedy_ranks(spectra: Spectra, shapes: Shapes, budget: int) -> dict[str, int]:
    """Directions added by sigma per parameter while the budget allows (module docstring)."""
    sigma = _sorted(spectra)
    _check(sigma, shapes, budget)
    ranks = {name: 0 for name in sigma}
    spent = 0
    while True:
        best, best_score, best_cost = None, -1.0, 0
        for name, s in sigma.items():
            r = ranks[name]
            if r >= len(s):
                continue
            cost = compact_size(r + 1, *shapes[name]) - compact_size(r, *shapes[name])
            if spent + cost > budget:
                continue
            score = float("inf") if cost <= 0 else s[r] / cost
            if score > best_score:
                best, best_score, best_cost = name, score, cost
        if best is None:
            return ranks
        ranks[best] += 1
        spent += best_cost


def _check(sigma: Mapping[str, list[float]], shapes: Shapes, budget: int) -> None:
    missing = set(sigma) ^ set(shapes)
    if missing:
        raise ValueError(
            f"allocation: spectra and shapes name different matrices {sorted(missing)}"
        )
    for name, s in sigma.items():
        if len(s) != min(shapes[name]):
            raise ValueError(
                f"allocation: {name} has {len(s)} singular values, shape {shapes[name]}"
            )
    if budget < 0:
        raise ValueError(f"allocation: the budget {budget} is negative")
