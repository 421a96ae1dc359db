"""Magnitude-pruning baselines for STR: uniform magnitude, GMP and budget transfer.

- Gradual magnitude pruning (GMP; Zhu and Gupta 2017, "To prune, or not to prune", equation (1)),
  the main baseline of STR (Kusupati et al., ICML 2020, section 5). In sparsity terms

      s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3,   t_0 <= t <= t_1,

  and in density terms (d = 1 - s) d_t = d_f + (d_i - d_f) (1 - (t - t_0) / (t_1 - t_0))^3.
- Budget transfer (STR section 5.1, "GMP with STR budgets"): the per-layer densities of any run's
  budget.csv become the per-layer targets of GMP or of one-shot magnitude pruning.

A mask is a ``torch.nn.utils.parametrize`` parametrization W -> W * M like STR's S_g(W, s), so
``budget_table`` counts both the same way and ``remove_masks`` bakes W * M into plain weights.
Pruned entries get zero gradient through the mask, and at every mask update their underlying
values (``parametrizations.weight.original``) are set to exactly zero; ``GMPCallback`` re-zeroes
them after every optimizer step, so momentum cannot leave stale values behind. A new mask is
chosen among the currently kept weights only (magnitudes of W * M), so GMP never regrows a
weight, as in the paper's GMP. Masks are buffers: they are saved in the model's state_dict.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from strlowrank.method import budget as budget_mod
from strlowrank.method.threshold import is_parametrized, select_modules, weight_parametrizations

GMP_MODES = ("layer", "global")


class MagnitudeMask(nn.Module):
    """Parametrization W -> W * M, M a boolean buffer of W's shape (no parameters, no roles)."""

    param_roles: dict[str, str] = {}

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)

    def density(self) -> float:
        """Fraction of kept entries, |M|_0 / numel."""
        return float(self.mask.float().mean())


def apply_masks(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[str]:
    """Register an all-ones ``MagnitudeMask`` on the weight of every selected conv/linear module.

    Modules that already carry a parametrization (STR, a mask) are skipped. Apply masks before
    building the optimizer. Returns the qualified names of the masked modules, in network order.
    """
    selected = [
        (n, m) for n, m in select_modules(model, include, exclude) if not is_parametrized(m)
    ]
    if not selected:
        raise ValueError(f"apply_masks: no unparametrized conv/linear module matches {include}")
    for _, module in selected:
        mask = torch.ones_like(module.weight, dtype=torch.bool)
        parametrize.register_parametrization(module, "weight", MagnitudeMask(mask))
    return [n for n, _ in selected]


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module, MagnitudeMask]]:
    """(name, module, MagnitudeMask) of every masked module, in network order."""
    return [(n, m, p) for n, m, p in weight_parametrizations(model) if isinstance(p, MagnitudeMask)]


def _original(module: nn.Module) -> torch.Tensor:
    """The trained tensor under the parametrization (``parametrizations.weight.original``)."""
    return module.parametrizations.weight.original


@torch.no_grad()
def _set_mask(module: nn.Module, mask: MagnitudeMask, keep: torch.Tensor) -> None:
    """Install the flat boolean ``keep`` as the mask and zero the pruned original entries."""
    mask.mask.copy_(keep.view_as(mask.mask))
    _original(module).mul_(mask.mask.to(_original(module).dtype))


def _scores(module: nn.Module, mask: MagnitudeMask) -> torch.Tensor:
    """|W * M| flattened, float32: pruned entries score 0 so they are never picked first."""
    return (_original(module).detach().float() * mask.mask).abs().flatten()


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean vector with exactly ``k`` True entries at the largest ``scores``."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(scores, k, sorted=False).indices] = True
    return keep


def _check_density(d: float, what: str) -> float:
    if not 0.0 <= d <= 1.0 or math.isnan(d):
        raise ValueError(f"{what}: density must be in [0, 1], got {d}")
    return float(d)


def set_layer_densities(model: nn.Module, densities: dict[str, float]) -> dict[str, int]:
    """Per-layer magnitude pruning: keep the round(d * numel) largest |W| of each named layer.

    Args:
        densities: {module name: density in [0, 1]}; masked layers not named are unchanged.
    Returns:
        {module name: number of kept entries}. Pruned original entries are set to zero.
    """
    masks = {n: (m, p) for n, m, p in masked_modules(model)}
    unknown = sorted(set(densities) - set(masks))
    if unknown:
        raise KeyError(f"set_layer_densities: not masked modules: {unknown}; call apply_masks")
    kept = {}
    for name, d in densities.items():
        module, mask = masks[name]
        k = round(_check_density(d, name) * mask.mask.numel())
        _set_mask(module, mask, _top_k(_scores(module, mask), k))
        kept[name] = k
    return kept


def set_global_density(model: nn.Module, density: float) -> dict[str, float]:
    """Global magnitude pruning: one threshold over all masked layers.

    Keeps exactly round(density * N) entries with the largest |W| among the N entries of all
    masked weights together. Returns the resulting per-layer densities.
    """
    layers = masked_modules(model)
    if not layers:
        raise ValueError("set_global_density: the model has no masks; call apply_masks first")
    scores = torch.cat([_scores(m, p) for _, m, p in layers])
    keep = _top_k(scores, round(_check_density(density, "global") * scores.numel()))
    out, offset = {}, 0
    for name, module, mask in layers:
        n = mask.mask.numel()
        _set_mask(module, mask, keep[offset : offset + n])
        out[name] = mask.density()
        offset += n
    return out


def uniform_densities(
    names: Sequence[str], density: float, keep_dense: Sequence[str] = ()
) -> dict[str, float]:
    """{name: density} for every name, 1.0 for names matching a ``keep_dense`` glob."""
    _check_density(density, "uniform_densities")
    return {
        n: 1.0 if any(fnmatch.fnmatchcase(n, p) for p in keep_dense) else float(density)
        for n in names
    }


def ramp(
    t: float, start: float, end: float, initial: float, final: float, shape: str = "cubic"
) -> float:
    """Zhu and Gupta's schedule: ``initial`` before ``start``, ``final`` from ``end`` on, between

    v_t = v_f + (v_i - v_f) (1 - p)^3,   p = (t - start) / (end - start)   (linear: 1 - p)

    and ``final`` from ``start`` on when ``end <= start``. t, start and end share one unit (steps
    or a fraction of training); the pruning schedule and the budget controller's target use it.
    """
    p = 1.0 if end <= start else min(max((t - start) / (end - start), 0.0), 1.0)
    remaining = (1.0 - p) ** 3 if shape == "cubic" else 1.0 - p
    return float(final + (initial - final) * remaining) if t >= start else float(initial)


def gmp_density(
    step: int, start_step: int, end_step: int, final_density: float, initial_density: float = 1.0
) -> float:
    """Gradual magnitude pruning's density at ``step``: :func:`ramp` (cubic) from
    ``initial_density`` at ``start_step`` to ``final_density`` at ``end_step``."""
    return ramp(step, start_step, end_step, initial_density, final_density)


def mask_density(model: nn.Module) -> float:
    """Kept fraction over all masked weights together (1.0 when nothing is masked)."""
    layers = masked_modules(model)
    total = sum(p.mask.numel() for _, _, p in layers)
    kept = sum(int(p.mask.sum()) for _, _, p in layers)
    return kept / total if total else 1.0


@torch.no_grad()
def zero_pruned(model: nn.Module) -> None:
    """Set the original values under every mask's zeros to exactly 0 (idempotent)."""
    for _, module, mask in masked_modules(model):
        _original(module).mul_(mask.mask.to(_original(module).dtype))


def remove_masks(model: nn.Module) -> list[str]:
    """Bake W * M into plain ``weight`` Parameters and drop the masks (same outputs)."""
    names = []
    for name, module, _ in masked_modules(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        names.append(name)
    return names


class GMPCallback:
    """Engine callback for gradual magnitude pruning (Zhu and Gupta 2017).

    Every ``update_every`` optimizer steps between epochs ``start_epoch`` and ``end_epoch`` (and
    at the end step) the masks are reset by magnitude to the cubic schedule ``gmp_density``:

    - mode "layer" with ``densities=None``: every masked layer at the same density, from
      ``initial_density`` to ``final_density`` (uniform magnitude pruning, gradually);
    - mode "layer" with ``densities`` (a per-layer budget, e.g. ``read_budget_densities``): layer l
      goes from ``initial_density`` to densities[l]; masked layers missing from it stay dense;
    - mode "global": one magnitude threshold over all masked layers to ``final_density``.

    After every step the pruned original weights are re-zeroed (``zero_pruned``). Masks must be
    applied (``apply_masks``) before the optimizer is built. ``end_epoch=None`` ends pruning at
    75% of training; the end step is clipped to the last step, so the target is always reached.
    Every rank computes the same masks from the same weights (no communication).
    """

    def __init__(
        self,
        final_density: float | None = None,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        update_every: int = 100,
        mode: str = "layer",
        densities: dict[str, float] | None = None,
        initial_density: float = 1.0,
    ) -> None:
        if mode not in GMP_MODES:
            raise ValueError(f"GMPCallback: mode must be one of {GMP_MODES}, got {mode!r}")
        if (final_density is None) == (densities is None) or (densities and mode != "layer"):
            raise ValueError("GMPCallback: give final_density, or per-layer densities (mode layer)")
        if update_every < 1:
            raise ValueError(f"GMPCallback: update_every must be >= 1, got {update_every}")
        self.final_density = final_density
        self.densities = dict(densities) if densities is not None else None
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.update_every, self.mode = update_every, mode
        self.initial_density = initial_density
        self.start_step, self.end_step = 0, 0
        self.last_update = -1

    def on_train_start(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        if not masked_modules(model):
            raise ValueError("GMPCallback: the model has no masks; call apply_masks first")
        total = steps_per_epoch * epochs
        end_epoch = 0.75 * epochs if self.end_epoch is None else self.end_epoch
        self.start_step = round(self.start_epoch * steps_per_epoch)
        self.end_step = max(self.start_step, min(round(end_epoch * steps_per_epoch), total - 1))

    def _due(self, step: int) -> bool:
        if not self.start_step <= step <= self.end_step:
            return False
        return (step - self.start_step) % self.update_every == 0 or step == self.end_step

    def targets(self, model: nn.Module, step: int) -> dict[str, float]:
        """Per-layer target densities at ``step`` (mode "layer")."""
        finals = self.densities
        if finals is None:
            finals = {n: float(self.final_density) for n, _, _ in masked_modules(model)}
        args = (step, self.start_step, self.end_step)
        return {n: gmp_density(*args, d, self.initial_density) for n, d in finals.items()}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if self._due(step):
            if self.mode == "global":
                args = (step, self.start_step, self.end_step, float(self.final_density))
                set_global_density(model, gmp_density(*args, self.initial_density))
            else:
                set_layer_densities(model, self.targets(model, step))
            self.last_update = step
        zero_pruned(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {"mask_density": mask_density(model)}

    def state_dict(self) -> dict:
        return {"last_update": self.last_update}

    def load_state_dict(self, state: dict) -> None:
        self.last_update = int(state.get("last_update", -1))


def read_budget_densities(csv_path: str | Path) -> dict[str, float]:
    """Per-layer densities {module name: nnz / numel} from a run's budget.csv.

    Uses nnz / numel when both columns exist, else 1 - sparsity (a fraction in [0, 1]). Skips the
    final "total" row and rows without a count (e.g. low-rank entries with numel NaN); a name
    ending in ".weight" is mapped to its module.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise ValueError(f"budget file {path} does not exist")
    table = pd.read_csv(path)
    cols = set(table.columns)
    if "name" not in cols or not ({"nnz", "numel"} <= cols or "sparsity" in cols):
        raise ValueError(
            f"{path}: a budget table needs columns name and nnz+numel (or sparsity); "
            f"found {sorted(cols)}"
        )
    table = budget_mod.layers(table)
    if {"nnz", "numel"} <= cols:
        density = table["nnz"] / table["numel"]
    else:
        density = 1.0 - table["sparsity"]
    out = {}
    for name, d in zip(table["name"].astype(str), density):
        if math.isnan(d):
            continue
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"{path}: density {d} of {name} outside [0, 1] (sparsity in percent?)")
        out[name.removesuffix(".weight")] = float(d)
    if not out:
        raise ValueError(f"{path}: no per-layer rows")
    return out
