"""Exact threshold shift: move every STR threshold by one common delta so that a total is met.

Given a measure y(model) that is non-decreasing in the thresholds (strlowrank.training.measures),
every threshold parameter s_l (role "threshold": STR layers, STR matrices) is shifted by one delta,
found by bisection:

    s_l <- s_l + delta,     y(s + delta) = target

Since g(s) = sigmoid(s) ~ exp(s) for s << 0, the shift multiplies every layer's threshold by about
the same factor exp(delta): the per-layer allocation learned by STR is kept. With compensation,
an entry v that survives the change keeps its soft-thresholded value sign(v) max(|v| - t, 0):
|v| moves with the threshold t, so only the entries between the old and the new threshold change
(magnitude pruning or reviving at the threshold). A target that no shift reaches (g saturates)
moves the entries at the boundary instead, by one relative margin for every site. The budget
controller (strlowrank.training.controller) calls :func:`shift_thresholds`; docs/CONTROLLER.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from strlowrank.method.group_threshold import group_thresholds
from strlowrank.method.lowrank import STRMatrix
from strlowrank.method.threshold import thresholded_modules
from strlowrank.training.measures import Measure
from strlowrank.training.optim import parameter_roles

Site = tuple[torch.Tensor, Callable[[], torch.Tensor], bool]  # (values, threshold(), magnitude?)


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter whose role is 'threshold' (STR layers, STR matrices)."""
    return [p for _, p, role in parameter_roles(model) if role == "threshold"]


def threshold_sites(model: nn.Module) -> list[Site]:
    """(values, threshold(), magnitude?) for every thresholded tensor whose threshold does not
    depend on the values: STR weights (|W| against g(s)), BatchNorm scales with a channel
    threshold (|gamma| against g(s)) and the singular values of STR matrices with a fixed
    threshold unit (sigma against tau; ``threshold_scale`` init, cost or one).
    With ``"max"`` / ``"rms"`` units tau moves with sigma, so those matrices are left out."""
    sites: list[Site] = [
        (module.parametrizations.weight.original, p.threshold, True)
        for _, module, p in thresholded_modules(model)
    ]
    sites += [
        (m.sigma, lambda m=m: m.tau().detach(), False)
        for m in model.modules()
        if isinstance(m, STRMatrix) and m.threshold_scale in ("init", "cost", "one")
    ]
    sites += [  # channel thresholds on BatchNorm scales: one entry per channel, like STR
        (module.parametrizations.weight.original, lambda p=p: p.threshold() * p.scale, True)
        for _, module, p in group_thresholds(model)
        if p.scale is not None and module.parametrizations.weight.original.dim() == 1
    ]
    return sites


@torch.no_grad()
def compensate_survivors(
    values: torch.Tensor, before: torch.Tensor, after: torch.Tensor, magnitude: bool = True
) -> None:
    """Keep the soft-thresholded value of every entry above both thresholds across a threshold
    change ``before`` -> ``after``: |v| += after - before there (v itself when not
    ``magnitude``). Entries between the two thresholds cross (pruned or revived, with values
    below |after - before|); the count above the threshold is the one ``after`` gives."""
    mag = values.abs() if magnitude else values
    survives = mag > torch.maximum(before, after)
    moved = mag + (after - before).to(values.dtype)
    values.copy_(torch.where(survives, torch.sign(values) * moved if magnitude else moved, values))


def _bisect(
    f: Callable[[float], float], target: float, low: float, high: float
) -> tuple[float, float, bool]:
    """x in [low, high] with non-decreasing f(x) closest to ``target``, by bracketing from 0
    (steps doubling from 1/8) and bisection; (x, f(x), reached). f is left evaluated at some x."""
    y0 = f(0.0)
    lo, hi, y_lo, y_hi, step = 0.0, 0.0, y0, y0, 0.125
    while y_hi < target and hi < high:  # bracket: f(lo) < target <= f(hi)
        lo, y_lo, hi = hi, y_hi, min(hi + step, high)
        y_hi, step = f(hi), 2 * step
    while y_lo >= target and lo > low:
        hi, y_hi, lo = lo, y_lo, max(lo - step, low)
        y_lo, step = f(lo), 2 * step
    if y_hi < target or y_lo > target:
        return 0.0, y0, False
    for _ in range(40):
        if hi - lo < 1e-7 * max(1.0, abs(hi)):
            break
        mid = 0.5 * (lo + hi)
        y_mid = f(mid)
        lo, y_lo, hi, y_hi = (mid, y_mid, hi, y_hi) if y_mid < target else (lo, y_lo, mid, y_mid)
    return (lo, y_lo, True) if abs(y_lo - target) < abs(y_hi - target) else (hi, y_hi, True)


@torch.no_grad()
def move_boundary(
    values: torch.Tensor,
    base: torch.Tensor,
    threshold: torch.Tensor,
    rel: float,
    magnitude: bool = True,
) -> None:
    """What a compensated threshold change t -> t (1 + rel) does to the entries, with t kept:
    rel > 0 prunes the survivors whose margin m = |v| - t is below rel t (|v| <- t, value 0);
    rel < 0 revives the entries with rel t < m <= 0 (|v| <- |v| - rel t, value m - rel t)."""
    mag = base.abs() if magnitude else base
    margin = mag - threshold
    if rel >= 0:
        new = torch.where((margin > 0) & (margin < rel * threshold), threshold.to(mag.dtype), mag)
    else:
        new = torch.where((margin <= 0) & (margin > rel * threshold), mag - rel * threshold, mag)
    values.copy_(torch.sign(base) * new if magnitude else new)


@torch.no_grad()
def shift_thresholds(
    model: nn.Module,
    measure: Measure,
    target: float,
    max_shift: float = 64.0,
    compensate: bool = True,
) -> tuple[float, float]:
    """Shift every threshold parameter by one delta so that ``measure`` is closest to ``target``.

    ``measure`` must be non-decreasing in delta. With ``compensate`` the values that survive
    keep their thresholded value (:func:`compensate_survivors`), so the shift acts like
    magnitude pruning (or reviving) at the threshold and leaves the rest of the network as it
    was. A target that no shift within ``max_shift`` reaches (g(s) saturates: a threshold can
    not exceed its unit, and a saturated s gets no gradient) keeps s and, with ``compensate``,
    moves the entries at the boundary instead (:func:`move_boundary`, one relative margin for
    every site, found by bisection); without it the model is left as it was.
    Returns (delta of s, measured total after).
    """
    params = threshold_parameters(model)
    base = [p.detach().clone() for p in params]
    sites = threshold_sites(model) if compensate else []
    before = [threshold().clone() for _, threshold, _ in sites]

    def at(delta: float) -> float:
        for p, b in zip(params, base):
            p.copy_(b + delta)
        return measure(model)

    delta, y, reached = _bisect(at, target, -max_shift, max_shift)
    y = at(delta if reached else 0.0)
    if reached:
        for (values, threshold, magnitude), old in zip(sites, before):
            compensate_survivors(values, old, threshold(), magnitude)
        return delta, measure(model) if sites else y
    if not sites:
        return 0.0, y
    saved = [values.detach().clone() for values, _, _ in sites]

    def moved(rel: float) -> float:
        for (values, _, magnitude), b, t in zip(sites, saved, before):
            move_boundary(values, b, t, rel, magnitude)
        return measure(model)

    rel, y, reached = _bisect(moved, target, -1.0, 2.0**20)
    return 0.0, moved(rel if reached else 0.0)
