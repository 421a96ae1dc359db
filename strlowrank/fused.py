"""A fused soft threshold: STR's S_g(W, s) with one-pass forward and backward (issue #7, P1).

Same function as ``strlowrank.threshold.soft_threshold`` (Kusupati et al., ICML 2020, eq. (2)):

    S_g(W, s) = sign(W) * relu(|W| - g(s)) = W - clamp(W, -g(s), g(s)),   g = sigmoid

and the same sub-gradients (relu'(0) = 0, as autograd):

    dL/dW = dL/dS * 1[S != 0]
    dL/ds = -g'(s) * sum_{S != 0} dL/dS * sign(S)      (summed to the shape of s)

The autograd graph of the plain expression saves several full-size tensors (sign(W),
|W| - g, the relu output) and runs about six elementwise passes each way. Here the forward is
two passes (clamp, subtract), the backward four (sign, a dot product for dL/ds, square,
multiply), and the only tensor saved is the output S itself, which the conv / linear layer
that consumes the weight saves anyway, so the threshold adds no memory of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from strlowrank.threshold import SoftThreshold, thresholded_modules


class _SoftThresholdFn(torch.autograd.Function):
    """S = W - clamp(W, -g(s), g(s)) in float32; saves S (and W, a leaf that lives anyway).

    A scalar threshold on CPU reads g(s) as a Python number (no device sync there) and uses the
    single-pass kernels softshrink / softshrink_backward, which compute exactly this S and
    dL/dW = dL/dS * 1[|W| > g(s)].
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(s.float())
        w32 = w.float()
        ctx.lambd = float(t) if s.numel() == 1 and w.device.type == "cpu" else None
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
                signed = torch.dot(grad.float().reshape(-1), sgn.view(-1)).reshape(s.shape)
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


def fused_soft_threshold(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sign(w) * relu(|w| - sigmoid(s)) with ``soft_threshold``'s values and gradients.

    ``s`` broadcasts against ``w`` (shape [] or [out, 1, ...]); arithmetic in float32 under
    autocast as well, output in w's dtype. Only the sigmoid threshold is supported.
    """
    with torch.autocast(device_type=w.device.type, enabled=False):
        return _SoftThresholdFn.apply(w, s)


class FusedSoftThreshold(SoftThreshold):
    """``SoftThreshold`` whose forward is ``fused_soft_threshold`` (same parameter ``s``)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fused_soft_threshold(w, self.s)


def fuse_soft_thresholds(model: nn.Module) -> int:
    """Swap every ``SoftThreshold`` parametrization of ``model`` for a ``FusedSoftThreshold``
    sharing the same ``s`` Parameter (optimizer state stays valid). Returns how many."""
    swapped = 0
    for _, module, p in list(thresholded_modules(model)):
        if isinstance(p, FusedSoftThreshold):
            continue
        plist = module.parametrizations["weight"]
        for i, q in enumerate(plist):
            if q is p:
                plist[i] = FusedSoftThreshold(p.s)
                swapped += 1
    assert all(parametrize.is_parametrized(m) for _, m, _ in thresholded_modules(model))
    return swapped
