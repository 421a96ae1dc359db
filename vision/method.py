"""The vision track's methods applied to a model: dense, STR, or a pruning baseline.

``method.name`` (vision/config.py) selects one: ``dense`` leaves the model as it is; ``str`` puts
a soft threshold on the conv and linear weights (Kusupati et al., ICML 2020), or with
``granularity structured`` a soft threshold per conv output channel, on its BatchNorm's gamma
(or the filter's norm without one; strlowrank.method.group_threshold: whole channels go); ``gmp``
prunes by magnitude on a schedule (ranked globally or per layer), ``uniform`` to the same
sparsity in every layer, ``transfer`` each layer to the density an STR run learned (its
budget.csv); ``group_norm`` removes channels once, before training, with torch-pruning's
group-norm magnitude pruner to ``final_macs`` of the model's MACs (the structured baseline:
start it ``--init-from`` a trained dense run); ``group_reg`` trains the dense network under
torch-pruning's group regularization (its sparse training: a ``group_norm`` run started
``--init-from`` it then prunes). The first and last layers stay dense when the
config says so. ``--init-from`` a structured STR run starts from the smaller network it learned
(`smaller_network`: its dead channels removed), which any method then trains.
"""

from __future__ import annotations

import copy

import torch

from strlowrank import apply_soft_threshold, budget_table, totals
from strlowrank.method import pruning
from strlowrank.method.channel_groups import GroupRegularizer, group_norm_prune
from strlowrank.method.group_threshold import apply_group_threshold, group_thresholds
from strlowrank.method.threshold import select_modules
from strlowrank.training.checkpoint import CheckpointError, load_checkpoint, load_model_state
from strlowrank.training.config import ConfigError, from_dict
from strlowrank.training.controller import BudgetController
from strlowrank.training.measures import from_reduction
from vision.config import VisionConfig
from vision.models import first_last_layer_names


def sparsify(model: torch.nn.Module, cfg: VisionConfig, example: torch.Tensor) -> list:
    """Apply the configured method to ``model`` (``example``: one input batch, for the methods
    that trace the network); return the engine callbacks it needs."""
    m = cfg.method
    first, last = first_last_layer_names(model)
    keep = ((first, m.keep_first_dense), (last, m.keep_last_dense))
    exclude = tuple(name for name, dense in keep if dense) + tuple(m.dense_layers)
    for pattern in m.dense_layers:
        if not select_modules(model, (pattern,)):
            raise ValueError(
                f"method.dense_layers: {pattern!r} matches no conv or linear layer of "
                f"{cfg.model.name}"
            )
    if m.name == "dense":
        return []
    structured = m.name == "str" and m.granularity == "structured"
    for field, value in (("gate", m.gate), ("streams", m.streams)):
        if not structured and value in ("hard", "keep"):
            raise ValueError(
                f"method.{field} {value}: a channel option; it needs --method.granularity "
                "structured"
            )
    if structured:
        apply_group_threshold(
            model,
            example,
            exclude=exclude,
            s_init=m.s_init,
            hard=m.gate == "hard",
            keep_streams=m.streams == "keep",
        )
        return []
    if m.name == "str":
        apply_soft_threshold(model, exclude=exclude, s_init=m.s_init, granularity=m.granularity)
        return []
    if m.name == "group_norm":
        prune_to_macs(model, example, m.final_macs, exclude=(last,))
        return []
    if m.name == "group_reg":
        return [GroupRegularizer(model, example, m.group_reg, [model.get_submodule(last)])]
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


def prune_to_macs(
    model: torch.nn.Module,
    example: torch.Tensor,
    fraction: float,
    exclude: tuple[str, ...],
    round_to: int | None = None,
) -> float:
    """Group-norm prune ``model`` in place to the largest size with at most ``fraction`` of its
    MACs (the pruning ratio found by bisection on copies; ``round_to``: widths multiples of
    it); returns the MACs fraction reached."""
    dense = totals(budget_table(model, example))["macs_dense"]

    def pruned(ratio: float) -> tuple[torch.nn.Module, float]:
        twin = copy.deepcopy(model)
        ignored = [twin.get_submodule(n) for n in exclude]
        group_norm_prune(twin, example, ratio, ignored, round_to)
        return twin, totals(budget_table(twin, example))["macs_dense"] / dense

    lo, hi = 0.0, 0.9  # torch-pruning leaves a layer as it is where a ratio would empty it
    if pruned(hi)[1] > fraction:
        raise ValueError(f"method.final_macs {fraction:g}: group-norm pruning cannot go this low")
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if pruned(mid)[1] > fraction else (lo, mid)
    group_norm_prune(model, example, hi, [model.get_submodule(n) for n in exclude], round_to)
    return totals(budget_table(model, example))["macs_dense"] / dense  # deterministic: = twin's


def check_reachable(model: torch.nn.Module, controller: BudgetController) -> None:
    """One-line error when a structured model cannot reach the controller's target: the total
    with every group threshold at its ceiling (g(s) = 1) is the most a threshold shift can do
    (layers kept dense keep their channels, and so do the residual streams they write)."""
    params = [p.s for _, _, p in group_thresholds(model)]
    saved = [s.detach().clone() for s in params]
    with torch.no_grad():
        for s in params:
            s.fill_(30.0)  # sigmoid(30) = 1 in float32
        most = controller.measure(model)
        for s, value in zip(params, saved):
            s.copy_(value)
    if controller.target > most:
        cfg = controller.cfg
        reach = from_reduction(cfg.metric, most, controller.scale)
        raise ValueError(
            f"controller.target: {cfg.target:g} {cfg.metric} is out of reach of this "
            f"structured model (at most down to {reach:.4g}; layers kept dense keep channels)"
        )


def structured_source(path: str) -> VisionConfig | None:
    """The config of the run in checkpoint ``path`` when it is a structured STR run (its
    thresholds choose channels), else None (a dense run, a torchvision file)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return None  # not a run's checkpoint: load_pretrained says what it is
    config = state.get("config") if isinstance(state, dict) else None
    method = config.get("method", {}) if isinstance(config, dict) else {}
    if method.get("name") != "str" or method.get("granularity") != "structured":
        return None
    try:
        return from_dict(VisionConfig, config)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"model.init_from: {path}: not a vision run's config ({e})") from None


def smaller_network(
    model: torch.nn.Module, source: VisionConfig, path: str, example: torch.Tensor
) -> torch.nn.Module:
    """The network a structured STR run learned: ``model`` (built like the run's) gets the run's
    channel thresholds and its weights from checkpoint ``path``, then its dead channels are
    removed (`strlowrank.export.structured_export.export_pruned_cnn`: outputs unchanged). The
    result is a plain, trainable CNN with fewer channels."""
    from strlowrank.export.structured_export import export_pruned_cnn

    sparsify(model, source, example)
    load_model_state(model, load_checkpoint(path)["model"], path)
    smaller = export_pruned_cnn(model, example)
    for p in smaller.parameters():
        p.requires_grad_(True)
    return smaller.train()
