"""Group soft threshold: STR on the L2 norm of each output channel's filter (structured STR).

    S_c = W_c * relu(||W_c|| - tau) / ||W_c||,    tau = g(s) sqrt(n),   g = sigmoid

W_c is output channel c's filter (n = C_in / groups x prod(kernel) entries), s one learnable
scalar per layer. ||W_c|| / sqrt(n) is the filter's RMS, so g(s) is in the units of one weight,
as in unstructured STR (Kusupati et al., ICML 2020, equation (2)), and the track's s_init and
threshold decay carry over. A filter with ||W_c|| <= tau is zero (its channel is dead); the
others shrink by tau along their direction (group soft thresholding, the proximal operator of
the group lasso). Gradients, exact (no straight-through estimator), with a_c = 1 - tau / n_c,
n_c = ||W_c||, G_c = dL/dS_c, summed over the alive channels n_c > tau:

    dL/dW_c = a_c G_c + tau <G_c, W_c> W_c / n_c^3        (0 for a dead channel)
    dL/ds   = -g'(s) sqrt(n) sum_c <G_c, W_c> / n_c

BatchNorm: a dead filter makes the conv's channel zero, but a BatchNorm after it would still
emit beta_c, a constant that the next layer sees, so the channel could not be removed without
changing the outputs. The BatchNorm that reads a thresholded conv's output therefore gets a
:class:`ChannelGate` on gamma and beta: both are multiplied by 1[n_c > tau], a dead channel is
exactly zero after its BatchNorm, and the network trains as the physically smaller one
computes. The gate does not enter the norm (the filter alone decides).

Which channels the smaller network keeps (across residual adds a channel goes only when every
conv that writes it is dead) is :mod:`strlowrank.channel_groups`' business; the coupling is
traced once here and kept on the thresholds for :func:`strlowrank.budget.budget_table`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from strlowrank.channel_groups import ChannelCoupling, coupled_channels, norm_after
from strlowrank.threshold import select_modules

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it is float64 (bf16 / fp16 cannot hold thresholds)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _group_norms(w: torch.Tensor) -> torch.Tensor:
    """||W_c|| over every dim but the first, shaped [out, 1, ...] (float32 or float64)."""
    dims = tuple(range(1, w.dim()))
    return torch.linalg.vector_norm(_wide(w), dim=dims, keepdim=True)


class _GroupSoftThresholdFn(torch.autograd.Function):
    """S_c = W_c relu(n_c - tau) / n_c in float32, with the exact gradients of the module
    docstring. Saves W and s (leaves that live anyway) and recomputes the norms."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        root = math.sqrt(w[0].numel())
        norms = _group_norms(w)
        tau = torch.sigmoid(_wide(s)) * root
        scale = torch.relu(norms - tau) / norms.clamp_min(torch.finfo(torch.float32).tiny)
        ctx.save_for_backward(w, s)
        return (_wide(w) * scale).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, s = ctx.saved_tensors
        root = math.sqrt(w[0].numel())
        w32, g32 = _wide(w), _wide(grad)
        norms = _group_norms(w)
        g = torch.sigmoid(_wide(s))
        tau = g * root
        alive = norms > tau
        safe = torch.where(alive, norms, torch.ones_like(norms))
        inner = (g32 * w32).sum(dim=tuple(range(1, w.dim())), keepdim=True)  # <G_c, W_c>
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            a = torch.where(alive, 1.0 - tau / safe, torch.zeros_like(norms))
            b = torch.where(alive, tau * inner / safe**3, torch.zeros_like(norms))
            grad_w = (a * g32 + b * w32).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            d_tau = -torch.where(alive, inner / safe, torch.zeros_like(norms)).sum()
            grad_s = (d_tau * g * (1.0 - g) * root).reshape(s.shape).to(s.dtype)
        return grad_w, grad_s


def group_soft_threshold(w: torch.Tensor, s: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Return W_c relu(||W_c|| - g(s) sqrt(n)) / ||W_c|| for every output channel c of ``w``.

    ``w`` [out, ...], ``s`` a scalar; computed in float32 (float64 for float64 inputs; also
    under autocast) and cast back.
    ``fused=False`` gives the plain expression, whose autograd has the same values and
    (sub-)gradients as the fused Function.
    """
    with torch.autocast(device_type=w.device.type, enabled=False):
        if fused:
            return _GroupSoftThresholdFn.apply(w, s)
        norms = _group_norms(w)
        tau = torch.sigmoid(_wide(s)) * math.sqrt(w[0].numel())
        scale = torch.relu(norms - tau) / norms.clamp_min(torch.finfo(torch.float32).tiny)
        return (_wide(w) * scale).to(w.dtype)


class GroupSoftThreshold(nn.Module):
    """Parametrization W -> S(W, s) of the module docstring, with a learnable scalar ``s``.

    ``coupling`` (set by :func:`apply_group_threshold`, shared by every layer of a model) says
    which channels of which layers the physically smaller network removes together.
    """

    param_roles = {"s": "threshold"}

    def __init__(self, s: nn.Parameter, fused: bool = True) -> None:
        super().__init__()
        self.s = s
        self.fused = fused
        self.coupling: ChannelCoupling | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return group_soft_threshold(w, self.s, fused=self.fused)

    def threshold(self) -> torch.Tensor:
        """g(s), detached: the filter RMS below which a channel is zero."""
        return torch.sigmoid(self.s.detach().float())

    def alive(self, w: torch.Tensor) -> torch.Tensor:
        """1[||W_c|| > g(s) sqrt(n)] as a float32 vector [out] (no gradient)."""
        tau = torch.sigmoid(self.s.detach().float()) * math.sqrt(w[0].numel())
        return (_group_norms(w.detach()).flatten() > tau).float()


class ChannelGate(nn.Module):
    """Parametrization of a BatchNorm's gamma or beta: x_c * 1[channel c of ``source`` alive].

    ``source`` is the ``parametrizations.weight`` list of the thresholded conv before the norm.
    It is held in a tuple, not registered as a submodule, so that the conv's parameters are
    not listed twice; ``copy.deepcopy`` of the whole model maps it to the copied conv.
    """

    def __init__(self, source: parametrize.ParametrizationList) -> None:
        super().__init__()
        self._source = (source,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plist = self._source[0]
        return x * plist[0].alive(plist.original).to(x.dtype)


def apply_group_threshold(
    model: nn.Module,
    example_input: torch.Tensor,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    s_init: float = -10.0,
) -> list[str]:
    """Register the group soft threshold on every selected conv of ``model`` (linear layers are
    left alone: a classifier's outputs are its classes), gate the BatchNorms right after them
    and trace the channel coupling of the smaller network (one forward of ``example_input``).

    Returns the qualified names of the thresholded convs, in network order.
    """
    selected = [
        (n, m) for n, m in select_modules(model, include, exclude, CONVS) if not _parametrized(m)
    ]
    if not selected:
        raise ValueError(f"apply_group_threshold: no conv module matches include={include}")
    coupling = coupled_channels(model, example_input)
    norms = norm_after(model, example_input)
    modules = dict(model.named_modules())
    for name, module in selected:
        s = nn.Parameter(torch.tensor(float(s_init), device=module.weight.device))
        gst = GroupSoftThreshold(s)
        gst.coupling = coupling
        parametrize.register_parametrization(module, "weight", gst)
        bn = modules[norms[name]] if name in norms else None
        if bn is not None and getattr(bn, "weight", None) is not None:
            for tensor in ("weight", "bias"):
                gate = ChannelGate(module.parametrizations.weight)
                parametrize.register_parametrization(bn, tensor, gate)
                bn.parametrizations[tensor].param_roles = {"original": "norm_bias"}
    return [n for n, _ in selected]


def _parametrized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


def group_thresholds(model: nn.Module) -> list[tuple[str, nn.Module, GroupSoftThreshold]]:
    """(name, module, GroupSoftThreshold) for every group-thresholded module."""
    found = []
    for name, module in model.named_modules():
        if _parametrized(module):
            found += [(name, module, p) for p in module.parametrizations["weight"]]
    return [(n, m, p) for n, m, p in found if isinstance(p, GroupSoftThreshold)]


def model_coupling(model: nn.Module) -> ChannelCoupling | None:
    """The channel coupling stored by :func:`apply_group_threshold`, None for other models."""
    return next((p.coupling for _, _, p in group_thresholds(model) if p.coupling), None)


def remove_group_threshold(model: nn.Module) -> list[str]:
    """Bake S(W, s) and the gated BatchNorm parameters into plain Parameters (same outputs);
    dead channels stay as zeros (``strlowrank.structured_export`` removes them)."""
    gated = [
        m
        for m in model.modules()
        if parametrize.is_parametrized(m)
        and any(isinstance(p, ChannelGate) for ps in m.parametrizations.values() for p in ps)
    ]
    for module in gated:  # before the convs whose thresholds they read
        for tensor in list(module.parametrizations):
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    names = []
    for name, module, _ in group_thresholds(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        names.append(name)
    return names
