"""Coupled channels of a CNN and their removal: what a physically smaller network keeps.

A channel of an activation can be removed only together with everything coupled to it: the
output channel of every conv that writes it (across a residual add: every block's last conv and
the shortcut of a stage), the BatchNorm channels after them, the matching channel of a
depthwise conv, and the input channel of every layer that reads it. torch-pruning's dependency
graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023; PyPI
``torch-pruning``) finds these groups; this module is the only one that imports it.

A group's channel i is *removable* when every conv that writes it outputs exactly zero there:
its filter and bias are zero and so are gamma_i and beta_i of the BatchNorm right after it
(:func:`zero_channels`). Removing it then leaves every output unchanged. Groups rooted at
linear layers (a classifier's outputs are its classes) are never removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = (*CONVS, nn.Linear)


@dataclass(frozen=True)
class Member:
    """One layer's side of a group: ``idxs[i]`` is its channel coupled to the group's channel i."""

    name: str
    side: str  # "out" (the layer writes the channel) or "in" (it reads it)
    idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels: ``size`` channels, each present in every member."""

    root: str
    size: int
    members: tuple[Member, ...]


@dataclass
class ChannelCoupling:
    """Every conv-rooted group of a model, and the BatchNorm that reads each conv's output."""

    groups: list[ChannelGroup] = field(default_factory=list)
    norm_after: dict[str, str] = field(default_factory=dict)


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise ImportError(
            "structured STR and export_pruned_cnn need torch-pruning: pip install "
            "torch-pruning==1.6.1"
        ) from None
    return torch_pruning


def _graph(model: nn.Module, example_input: torch.Tensor):
    """torch-pruning's DependencyGraph of ``model`` (traced in eval mode)."""
    tp = _torch_pruning()
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    finally:
        model.train(was_training)


def _conv_groups(graph, names: dict[nn.Module, str]) -> list[tuple[object, ChannelGroup]]:
    """(torch-pruning group, ChannelGroup) for every group rooted at a conv."""
    out = []
    for group in graph.get_all_groups(root_module_types=list(CONVS)):
        members = []
        size = len(group.items[0].idxs)
        for item in group.items:
            module = item.dep.target.module
            if not isinstance(module, LAYERS) or module not in names:
                continue
            side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            aligned = [0] * size
            for idx, root in zip(item.idxs, item.root_idxs):
                aligned[root] = int(idx)
            members.append(Member(names[module], side, tuple(aligned)))
        root = names[group.items[0].dep.target.module]
        out.append((group, ChannelGroup(root, size, tuple(members))))
    return out


def coupled_channels(model: nn.Module, example_input: torch.Tensor) -> ChannelCoupling:
    """The coupled channel groups of ``model`` (a plain model: trace it before parametrizing)."""
    names = {m: n for n, m in model.named_modules()}
    graph = _graph(model, example_input)  # traced through autograd: gradients on
    groups = [g for _, g in _conv_groups(graph, names)]
    return ChannelCoupling(groups, norm_after(model, example_input))


def norm_after(model: nn.Module, example_input: torch.Tensor) -> dict[str, str]:
    """conv name -> the name of the norm layer whose input is that conv's output tensor."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept: ids stay unique
    found: dict[str, str] = {}
    modules = dict(model.named_modules())
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

    def record(name: str):
        def hook(m, args, out) -> None:
            produced.setdefault(id(out), (name, out))

        return hook

    def read(name: str):
        def hook(m, args) -> None:
            if id(args[0]) in produced and produced[id(args[0])][1] is args[0]:
                found.setdefault(produced[id(args[0])][0], name)

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in modules.items() if isinstance(m, CONVS)]
    hooks += [
        m.register_forward_pre_hook(read(n)) for n, m in modules.items() if isinstance(m, norms)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def zero_channels(model: nn.Module, coupling: ChannelCoupling) -> dict[str, np.ndarray]:
    """conv name -> bool [out]: output channel is exactly zero (filter, bias, the gamma and beta
    of the norm after it), for every conv that writes a group's channels."""
    modules = dict(model.named_modules())
    writers = {m.name for g in coupling.groups for m in g.members if m.side == "out"}
    zero = {}
    with torch.no_grad():
        for name in writers:
            module = modules[name]
            dead = module.weight.flatten(1).abs().amax(dim=1) == 0
            if module.bias is not None:
                dead &= module.bias == 0
            norm = modules[coupling.norm_after[name]] if name in coupling.norm_after else None
            if norm is not None and norm.weight is not None:
                dead &= (norm.weight == 0) & (norm.bias == 0)
            elif norm is not None:  # a norm without affine parameters: output never zero
                dead &= False
            zero[name] = dead.cpu().numpy()
    return zero


def removable(coupling: ChannelCoupling, zero: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per group, the indices i (of the group's channels) that every writer outputs as zero;
    when that is all of them, the first stays (a layer keeps at least one channel)."""
    found = []
    for group in coupling.groups:
        ok = np.ones(group.size, dtype=bool)
        for m in group.members:
            if m.side == "out":
                ok &= zero[m.name][list(m.idxs)]
        ok[0] &= not ok.all()
        found.append(np.flatnonzero(ok))
    return found


def kept_channels(model: nn.Module, coupling: ChannelCoupling) -> dict[str, tuple[int, int]]:
    """layer name -> (output channels, input channels) that the smaller network keeps, for
    every conv and linear layer; a depthwise conv keeps as many inputs as outputs."""
    removed: dict[tuple[str, str], int] = {}
    for group, idxs in zip(coupling.groups, removable(coupling, zero_channels(model, coupling))):
        for m in group.members:
            removed[(m.name, m.side)] = removed.get((m.name, m.side), 0) + len(idxs)
    kept = {}
    for name, module in model.named_modules():
        if not isinstance(module, LAYERS):
            continue
        out_f, in_f = module.weight.shape[0], module.weight.shape[1] * getattr(module, "groups", 1)
        out_k = out_f - removed.get((name, "out"), 0)
        depthwise = isinstance(module, CONVS) and module.groups == in_f and module.groups > 1
        in_k = out_k if depthwise else in_f - removed.get((name, "in"), 0)
        kept[name] = (out_k, in_k)
    return kept


def remove_zero_channels(
    model: nn.Module, example_input: torch.Tensor, round_to: int | None = None
) -> dict[str, int]:
    """Remove, in place, every removable channel of a plain ``model`` (no parametrizations):
    convs, norms and linear layers get smaller weights; outputs are unchanged. ``round_to``
    keeps a few zero channels so that every group keeps a multiple of it (vectorized runtimes
    such as ONNX Runtime's blocked convs want multiples of 8 or 16). Returns {root conv name:
    channels removed} for the groups that lost channels."""
    names = {m: n for n, m in model.named_modules()}
    graph = _graph(model, example_input)  # traced through autograd: gradients on
    pairs = _conv_groups(graph, names)
    coupling = ChannelCoupling([g for _, g in pairs], norm_after(model, example_input))
    done = {}
    with torch.no_grad():
        for (group, info), idxs in zip(pairs, removable(coupling, zero_channels(model, coupling))):
            if round_to:  # keep the count rounded up, at most all
                kept = min(info.size, -(-(info.size - len(idxs)) // round_to) * round_to)
                idxs = idxs[: info.size - kept]
            if len(idxs):
                group.prune(idxs=[int(i) for i in idxs])
                done[info.root] = len(idxs)
    return done


def group_norm_prune(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    ignored: list[nn.Module],
    round_to: int | None = None,
) -> None:
    """torch-pruning's group-norm magnitude pruner, one shot, in place: every conv-rooted group
    loses the fraction ``ratio`` of its channels with the smallest L2 norm over all coupled
    weights (its default: the same ratio in every group). ``ignored``: layers whose outputs
    stay (the classifier); ``round_to``: every group keeps a multiple of it. A structured-pruning
    baseline for structured STR."""
    tp = _torch_pruning()
    was_training = model.training
    model.eval()
    try:
        pruner = tp.pruner.MagnitudePruner(
            model,
            example_input,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=round_to,
        )
        pruner.step()
    finally:
        model.train(was_training)


class GroupRegularizer:
    """torch-pruning's sparse training (``GroupNormPruner.regularize``, Fang et al., DepGraph,
    CVPR 2023) as an engine callback: before every optimizer step, each coupled channel group's
    weights (convs, linear inputs, BatchNorm scales) get ``reg`` * gamma_c * w added to their
    gradient, gamma_c growing from 1 (the group's most important channel by L2 norm) to 16 (its
    least), so unimportant channels decay towards zero before a one-shot group-norm prune
    (`group_norm_prune`). ``ignored``: layers whose outputs stay (the classifier)."""

    def __init__(
        self, model: nn.Module, example_input: torch.Tensor, reg: float, ignored: list[nn.Module]
    ) -> None:
        tp = _torch_pruning()
        was_training = model.training
        model.eval()
        try:
            self.pruner = tp.pruner.GroupNormPruner(
                model,
                example_input,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                reg=reg,
                ignored_layers=ignored,
            )
        finally:
            model.train(was_training)

    def on_before_step(self, model: nn.Module) -> None:
        self.pruner.regularize(model)
