"""Soft Threshold Reparameterization (STR), Kusupati et al., ICML 2020, equation (2).

    S_g(W, s) = sign(W) * relu(|W| - g(s)),   g = sigmoid

A weight is replaced by its soft-thresholded version with a learnable threshold parameter ``s``
(one per layer by default). Gradients are the true sub-gradients given by autograd:

    dL/dW = dL/dS * 1[|W| > g(s)]
    dL/ds = -g'(s) * sum_{|W| > g(s)} dL/dS * sign(W)

There is no sparsity loss: weight decay on ``s`` (which is negative) pulls it towards 0 and so
raises g(s). STR is applied as a ``torch.nn.utils.parametrize`` parametrization on stock conv and
linear modules, selected by name patterns; removing it bakes S_g(W, s) into plain weights.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

GRANULARITIES = ("layer", "channel", "global")
SPARSIFIABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _SoftThresholdFn(torch.autograd.Function):
    """S = W - clamp(W, -g(s), g(s)) in float32; saves S (and W, a leaf that lives anyway).

    A scalar threshold on CPU reads g(s) as a Python number (no device sync there) and uses the
    single-pass kernels softshrink / softshrink_backward, which compute exactly this S and
    dL/dW = dL/dS * 1[|W| > g(s)]. Under ``torch.compile`` the tensor path runs instead (reading
    a number would break the graph). W may have any memory format (contiguous, channels_last).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(s.float())
        w32 = w.float()
        scalar_cpu = s.numel() == 1 and w.device.type == "cpu"
        ctx.lambd = float(t) if scalar_cpu and not torch.compiler.is_compiling() else None
        if ctx.lambd is not None and not math.isfinite(ctx.lambd):
            ctx.lambd = None  # a NaN threshold must reach the loss (the engine reports it)
        if ctx.lambd is not None:
            out = F.softshrink(w32, ctx.lambd).to(w.dtype)
        else:
            out = torch.clamp(w32, -t, t)
            out = torch.sub(w32, out, out=out).to(w.dtype)  # one allocation, two passes
        ctx.save_for_backward(out, w, s)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        out, w, s = ctx.saved_tensors
        sgn = torch.sign(out.float())  # sign(S): +-1 where kept, 0 where pruned
        grad_s = None
        if ctx.needs_input_grad[1]:
            g = torch.sigmoid(s.float())
            if s.numel() == 1:  # one BLAS pass, no temporary
                signed = torch.dot(*_flat_in_memory_order(grad.float(), sgn)).reshape(s.shape)
            else:
                signed = (grad.float() * sgn).sum_to_size(s.shape)
            grad_s = (-g * (1.0 - g) * signed).to(s.dtype)
        grad_w = None
        if ctx.needs_input_grad[0] and ctx.lambd is not None:
            grad_w = torch.ops.aten.softshrink_backward(grad.float(), w.float(), ctx.lambd)
            grad_w = grad_w.to(grad.dtype)
        elif ctx.needs_input_grad[0]:
            grad_w = sgn.square_().mul_(grad).to(grad.dtype)
        return grad_w, grad_s


def _flat_in_memory_order(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (same shape) as 1-d tensors with matching entries, in ``b``'s memory order.

    The dims are permuted from ``b``'s largest stride to its smallest, so that a dense ``b`` in
    any memory format (contiguous, channels_last) flattens to a view; ``a`` gets the same
    permutation and is copied only when its layout differs from ``b``'s. A dot product of the
    two equals sum(a * b) whatever the layouts.
    """
    if not b.is_contiguous():
        order = sorted(range(b.dim()), key=lambda d: -b.stride(d))
        a, b = a.permute(order), b.permute(order)
    return a.reshape(-1), b.reshape(-1)


def soft_threshold(
    w: torch.Tensor,
    s: torch.Tensor,
    g: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
    fused: bool = True,
) -> torch.Tensor:
    """Return sign(w) * relu(|w| - g(s)), computed in float32, cast back to w's dtype.

    ``s`` broadcasts against ``w`` (a scalar for a per-layer threshold, shape [out, 1, ...] for
    a per-output-channel one). Thresholds near 1e-3 are below bf16 resolution, so the arithmetic
    runs in float32 even under autocast. With g = sigmoid the fused autograd function computes it
    (two passes each way, only S saved); ``fused=False`` or another g uses the plain expression,
    whose autograd gives the same values and sub-gradients.
    """
    with torch.autocast(device_type=w.device.type, enabled=False):
        if fused and g is torch.sigmoid:
            return _SoftThresholdFn.apply(w, s)
        w32 = w.float()
        out = torch.sign(w32) * F.relu(w32.abs() - g(s.float()))
    return out.to(w.dtype)


class SoftThreshold(nn.Module):
    """Parametrization W -> S_g(W, s) with a learnable threshold parameter ``s``.

    ``s`` has shape [] (per layer, or shared for a global threshold) or [out, 1, ..., 1]
    (per output channel). The same Parameter object may be shared by several instances.
    """

    param_roles = {"s": "threshold"}

    def __init__(self, s: nn.Parameter, fused: bool = True) -> None:
        super().__init__()
        self.s = s
        self.fused = fused  # False: the plain autograd expression (benchmarks, reference)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return soft_threshold(w, self.s, fused=self.fused)

    def threshold(self) -> torch.Tensor:
        """g(s), detached: the value below which weights are zeroed."""
        return torch.sigmoid(self.s.detach().float())


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_modules(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = SPARSIFIABLE,
) -> list[tuple[str, nn.Module]]:
    """Conv/linear modules whose qualified names match an ``include`` and no ``exclude`` glob."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types) and _matches(name, include) and not _matches(name, exclude)
    ]


def apply_soft_threshold(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    s_init: float = -5.0,
    granularity: str = "layer",
) -> list[str]:
    """Register STR on the ``weight`` of every selected conv/linear module of ``model``.

    Args:
        include, exclude: fnmatch globs over qualified module names (``"layer1.*"``, ``"fc"``).
        s_init: initial threshold parameter; g(s_init) is the initial threshold.
        granularity: ``"layer"`` (one s per weight tensor, the paper's default), ``"channel"``
            (one s per output channel) or ``"global"`` (one s shared by all selected layers).
    Returns:
        The qualified names of the modules STR was applied to, in network order.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    candidates = select_modules(model, include, exclude)
    selected = [(n, m) for n, m in candidates if not is_parametrized(m)]
    if not selected:
        raise ValueError(f"apply_soft_threshold: no conv/linear module matches include={include}")
    shared = None
    for _, module in selected:
        w = module.weight
        if granularity == "global":
            shared = shared if shared is not None else nn.Parameter(torch.tensor(float(s_init)))
            s = shared
        elif granularity == "channel":
            shape = (w.shape[0],) + (1,) * (w.dim() - 1)
            s = nn.Parameter(torch.full(shape, float(s_init), device=w.device))
        else:
            s = nn.Parameter(torch.tensor(float(s_init), device=w.device))
        parametrize.register_parametrization(module, "weight", SoftThreshold(s))
    return [n for n, _ in selected]


def is_parametrized(module: nn.Module, tensor_name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, tensor_name)


def weight_parametrizations(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Yield (module name, module, parametrization) for every parametrized ``weight``."""
    for name, module in model.named_modules():
        if is_parametrized(module):
            for p in module.parametrizations["weight"]:
                yield name, module, p


def thresholded_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, SoftThreshold]]:
    """Yield (name, module, SoftThreshold) for every STR-parametrized module."""
    for name, module, p in weight_parametrizations(model):
        if isinstance(p, SoftThreshold):
            yield name, module, p


def remove_soft_threshold(model: nn.Module) -> list[str]:
    """Bake S_g(W, s) into plain ``weight`` Parameters and drop the thresholds (same outputs)."""
    names = []
    for name, module, _ in list(thresholded_modules(model)):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        names.append(name)
    return names
