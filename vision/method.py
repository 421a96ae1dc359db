"""The vision track's methods applied to a model: dense, STR, or a magnitude-pruning baseline.

``method.name`` (vision/config.py) selects one: ``dense`` leaves the model as it is; ``str`` puts
a soft threshold on the conv and linear weights (Kusupati et al., ICML 2020); ``gmp`` prunes
by magnitude on a schedule (ranked globally or per layer), ``uniform`` to the same sparsity in
every layer, ``transfer`` each layer to the density an STR run learned (its budget.csv). The
first and last layers stay dense when the config says so.
"""

from __future__ import annotations

import torch

from strlowrank import apply_soft_threshold, pruning
from vision.config import VisionConfig
from vision.models import first_last_layer_names


def sparsify(model: torch.nn.Module, cfg: VisionConfig) -> list:
    """Apply the configured method to ``model``; return the engine callbacks it needs."""
    m = cfg.method
    first, last = first_last_layer_names(model)
    keep = ((first, m.keep_first_dense), (last, m.keep_last_dense))
    exclude = tuple(name for name, dense in keep if dense)
    if m.name == "dense":
        return []
    if m.name == "str":
        apply_soft_threshold(model, exclude=exclude, s_init=m.s_init, granularity=m.granularity)
        return []
    pruning.apply_masks(model, exclude=exclude)
    common = dict(start_epoch=m.start_epoch, end_epoch=m.end_epoch, update_every=m.update_every)
    if m.name == "transfer":
        if not m.budget:
            raise ValueError("method.budget: the transfer method needs an STR run's budget.csv")
        densities = pruning.read_budget_densities(m.budget)
        own = {n for n, _, _ in pruning.masked_modules(model)}
        if not own & set(densities):
            raise ValueError(f"{m.budget}: no layer name matches this model ({cfg.model.name})")
        return [
            pruning.GMPCallback(
                densities={k: v for k, v in densities.items() if k in own}, mode="layer", **common
            )
        ]
    mode = m.gmp_scope if m.name == "gmp" else "layer"
    return [pruning.GMPCallback(final_density=1.0 - m.final_sparsity, mode=mode, **common)]
