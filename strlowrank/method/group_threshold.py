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

Where a BatchNorm follows the conv, the threshold sits on its scale instead: the BatchNorm
undoes any positive scale of a filter, so shrinking W_c does not change the network's function,
the task gradient never resists the threshold (dL/ds = 0 while a channel lives) and whole layers
die at once (measured: docs/RESULTS.md). gamma_c is the channel's scale after the norm; the
threshold on it (each channel its own group of one, tau = g(s), gamma's initial value 1 as the
unit) is STR's S_g(gamma, s) (Kusupati et al., equation (2)), and a :class:`ChannelGate`
multiplies beta_c and the filter W_c by 1[|gamma_c| > tau]. Either way a dead channel is exactly
zero after its norm, and the network trains as the physically smaller one computes.

``hard=True`` gates instead of shrinking: S_c = W_c 1[||W_c|| > tau], so a kept channel passes
whole (no bias of tau on the channels that stay, as a relaxed lasso refits on the support the
lasso selected), dL/dW_c = G_c 1[n_c > tau], and s gets the soft threshold's gradient above (a
straight-through estimate: the change of the loss if every kept channel shrank with tau).

Which channels the smaller network keeps (across residual adds a channel goes only when every
conv that writes it is dead) is :mod:`strlowrank.method.channel_groups`' business; the coupling is
traced once here and kept on the thresholds for :func:`strlowrank.method.budget.budget_table`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from strlowrank.method.channel_groups import ChannelCoupling, coupled_channels, norm_after
from strlowrank.method.threshold import select_modules

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it is float64 (bf16 / fp16 cannot hold thresholds)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _group_norms(w: torch.Tensor) -> torch.Tensor:
    """||W_c|| over every dim but the first, shaped [out, 1, ...] (float32 or float64)."""
    dims = tuple(range(1, w.dim()))
    return torch.linalg.vector_norm(_wide(w), dim=dims, keepdim=True)


class _GroupSoftThresholdFn(torch.autograd.Function):
    """S_c = W_c relu(n_c - tau) / n_c (``hard``: W_c 1[n_c > tau]), tau = g(s) scale, in
    float32 (float64 for float64 W), with the gradients of the module docstring. Saves W and s
    (leaves that live anyway) and recomputes the norms."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, scale: float, hard: bool) -> torch.Tensor:
        norms = _group_norms(w)
        tau = torch.sigmoid(_wide(s)) * scale
        out = _shrink(_wide(w), norms, tau, hard)
        ctx.save_for_backward(w, s)
        ctx.scale, ctx.hard = scale, hard
        return out.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, s = ctx.saved_tensors
        w32, g32 = _wide(w), _wide(grad)
        norms = _group_norms(w)
        g = torch.sigmoid(_wide(s))
        tau = g * ctx.scale
        alive = norms > tau
        safe = torch.where(alive, norms, torch.ones_like(norms))
        inner = (g32 * w32).sum(dim=tuple(range(1, w.dim())), keepdim=True)  # <G_c, W_c>
        zero = torch.zeros_like(norms)
        grad_w = grad_s = None
        if ctx.needs_input_grad[0] and ctx.hard:
            grad_w = (g32 * alive).to(grad.dtype)
        elif ctx.needs_input_grad[0]:
            a = torch.where(alive, 1.0 - tau / safe, zero)
            b = torch.where(alive, tau * inner / safe**3, zero)
            grad_w = (a * g32 + b * w32).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            d_tau = -torch.where(alive, inner / safe, zero).sum()
            grad_s = (d_tau * g * (1.0 - g) * ctx.scale).reshape(s.shape).to(s.dtype)
        return grad_w, grad_s, None, None


_TINY = torch.finfo(torch.float32).tiny


def _shrink(w: torch.Tensor, norms: torch.Tensor, tau: torch.Tensor, hard: bool) -> torch.Tensor:
    if hard:
        return w * (norms > tau)
    return w * (torch.relu(norms - tau) / norms.clamp_min(_TINY))


def group_soft_threshold(
    w: torch.Tensor,
    s: torch.Tensor,
    scale: float | None = None,
    fused: bool = True,
    hard: bool = False,
) -> torch.Tensor:
    """Return W_c relu(||W_c|| - tau) / ||W_c|| (``hard``: W_c 1[||W_c|| > tau]) for every
    output channel c of ``w``.

    ``w`` [out, ...] (a 1-d ``w``: every entry its own group, sign(w) relu(|w| - tau)), ``s`` a
    scalar, tau = g(s) ``scale`` (default sqrt(n), n entries per channel). Computed in float32
    (float64 for float64 inputs; also under autocast) and cast back. ``fused=False`` gives the
    plain expression, whose autograd has the same values and (sub-)gradients (``hard``: the
    gated W plus the soft threshold of a detached W, less its value, for the gradient of s).
    """
    if w.dim() == 1:
        return group_soft_threshold(w.unsqueeze(1), s, scale, fused, hard).squeeze(1)
    scale = math.sqrt(w[0].numel()) if scale is None else float(scale)
    with torch.autocast(device_type=w.device.type, enabled=False):
        if fused:
            return _GroupSoftThresholdFn.apply(w, s, scale, hard)
        norms = _group_norms(w)
        tau = torch.sigmoid(_wide(s)) * scale
        out = _shrink(_wide(w), norms, tau, hard)
        if hard:  # s's gradient: the soft threshold's, with W held fixed
            soft = _shrink(_wide(w.detach()), norms.detach(), tau, False)
            out = out + (soft - soft.detach())
        return out.to(w.dtype)


class GroupSoftThreshold(nn.Module):
    """Parametrization W -> S(W, s) of the module docstring, with a learnable scalar ``s``:
    on a conv's filters (``scale`` None: tau = g(s) sqrt(n)) or on a BatchNorm's gamma (1-d,
    ``scale`` 1: tau = g(s), gamma's initial value 1 as the unit).

    ``hard``: kept channels pass whole (a gate, no shrinkage). ``coupling`` (set by
    :func:`apply_group_threshold`, shared by every layer of a model) says which channels of
    which layers the physically smaller network removes together.
    """

    param_roles = {"s": "threshold"}

    def __init__(
        self, s: nn.Parameter, scale: float | None = None, fused: bool = True, hard: bool = False
    ) -> None:
        super().__init__()
        self.s = s
        self.scale = scale
        self.fused = fused
        self.hard = hard
        self.coupling: ChannelCoupling | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return group_soft_threshold(w, self.s, self.scale, fused=self.fused, hard=self.hard)

    def threshold(self) -> torch.Tensor:
        """g(s), detached: the filter RMS (or |gamma|) below which a channel is zero."""
        return torch.sigmoid(self.s.detach().float())

    def alive(self, w: torch.Tensor) -> torch.Tensor:
        """1[||W_c|| > tau] as a float32 vector [out] (no gradient)."""
        w = w.detach().unsqueeze(1) if w.dim() == 1 else w.detach()
        scale = math.sqrt(w[0].numel()) if self.scale is None else self.scale
        return (_group_norms(w).flatten() > self.threshold() * scale).float()


class ChannelGate(nn.Module):
    """Parametrization x -> x_c 1[channel c alive] (c: the first dim of x), the channel's
    liveness read from the ``GroupSoftThreshold`` of ``source`` (a ``parametrizations.weight``
    list: the BatchNorm gamma, or the conv's filters). It gates a BatchNorm's beta and, when
    gamma holds the threshold, the conv's filters. ``source`` is held in a tuple, not as a
    submodule, so no parameter is listed twice; ``copy.deepcopy`` of the whole model maps it
    to the copy's.
    """

    def __init__(self, source: parametrize.ParametrizationList) -> None:
        super().__init__()
        self._source = (source,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plist = self._source[0]
        alive = plist[0].alive(plist.original).to(x.dtype)
        return x * alive.view(-1, *([1] * (x.dim() - 1)))

    def threshold(self) -> torch.Tensor:
        """g(s) of the threshold this gate reads."""
        return self._source[0][0].threshold()


def apply_group_threshold(
    model: nn.Module,
    example_input: torch.Tensor,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    s_init: float = -10.0,
    hard: bool = False,
    keep_streams: bool = False,
) -> list[str]:
    """Give every selected conv of ``model`` a channel threshold and trace the channel coupling
    of the smaller network (one forward of ``example_input``). A conv followed by a BatchNorm:
    the soft threshold on gamma, beta and the conv's filters gated; otherwise on the filters'
    norms. Linear layers are left alone (a classifier's outputs are its classes). ``hard``:
    kept channels pass whole (:class:`GroupSoftThreshold`). ``keep_streams``: convs whose
    output channels other convs write too (a residual stream: the stem, every block's last conv,
    the shortcuts) get no threshold, so only channels with one writer (a block's inner width) are
    learned.

    Returns the qualified names of the convs, in network order.
    """
    selected = [
        (n, m) for n, m in select_modules(model, include, exclude, CONVS) if not _parametrized(m)
    ]
    if not selected:
        raise ValueError(f"apply_group_threshold: no conv module matches include={include}")
    coupling = coupled_channels(model, example_input)
    if keep_streams:
        shared = {
            m.name
            for g in coupling.groups
            if sum(m.side == "out" for m in g.members) > 1
            for m in g.members
            if m.side == "out"
        }
        selected = [(n, m) for n, m in selected if n not in shared]
        if not selected:
            raise ValueError("apply_group_threshold: every selected conv writes a residual stream")
    norms = norm_after(model, example_input)
    modules = dict(model.named_modules())
    for name, module in selected:
        s = nn.Parameter(torch.tensor(float(s_init), device=module.weight.device))
        bn = modules[norms[name]] if name in norms else None
        if bn is None or getattr(bn, "weight", None) is None or _parametrized(bn):
            _register(module, "weight", GroupSoftThreshold(s, hard=hard), coupling)
            continue
        _register(bn, "weight", GroupSoftThreshold(s, scale=1.0, hard=hard), coupling)
        _register(bn, "bias", ChannelGate(bn.parametrizations.weight))
        _register(module, "weight", ChannelGate(bn.parametrizations.weight))
    return [n for n, _ in selected]


def _register(module: nn.Module, tensor: str, p: nn.Module, coupling=None) -> None:
    if coupling is not None:
        p.coupling = coupling
    parametrize.register_parametrization(module, tensor, p)
    if isinstance(module, NORMS):  # gamma and beta keep the norm parameters' role
        module.parametrizations[tensor].param_roles = {"original": "norm_bias"}


def _parametrized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


def group_thresholds(model: nn.Module) -> list[tuple[str, nn.Module, GroupSoftThreshold]]:
    """(name, module, GroupSoftThreshold) for every channel threshold (on a conv's weight or
    a BatchNorm's gamma)."""
    found = []
    for name, module in model.named_modules():
        if _parametrized(module):
            found += [(name, module, p) for p in module.parametrizations["weight"]]
    return [(n, m, p) for n, m, p in found if isinstance(p, GroupSoftThreshold)]


def model_coupling(model: nn.Module) -> ChannelCoupling | None:
    """The channel coupling stored by :func:`apply_group_threshold`, None for other models."""
    return next((p.coupling for _, _, p in group_thresholds(model) if p.coupling), None)


def remove_group_threshold(model: nn.Module) -> list[str]:
    """Bake the thresholds and gates into plain Parameters (same outputs); dead channels stay
    as zeros (``strlowrank.export.structured_export`` removes them). Returns the thresholded
    names."""
    gated = [
        (m, t)
        for m in model.modules()
        if parametrize.is_parametrized(m)
        for t, ps in m.parametrizations.items()
        if any(isinstance(p, ChannelGate) for p in ps)
    ]
    for module, tensor in list(gated):  # before the thresholds they read
        parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    names = []
    for name, module, _ in group_thresholds(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        names.append(name)
    return names
