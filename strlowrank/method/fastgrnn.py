"""The FastGRNN recurrence (Kusupati et al., NeurIPS 2018) with a hand-written backward pass.

One W [H, I] and one U [H, H] are shared by the gate and the update:

    p_t = W x_t + U h_{t-1},    z_t = sigmoid(p_t + b_z),    c_t = tanh(p_t + b_h)
    h_t = (zeta (1 - z_t) + nu) c_t + z_t h_{t-1}
    zeta = sigmoid(zeta_raw),   nu = sigmoid(nu_raw)

W x_t is computed for all steps in one product. The time loop runs in Python, so autograd over
it would record nine nodes per step; `FastGRNNFunction` instead saves z, c and h and runs the
backward recursion itself. With dh_t the gradient reaching h_t (from the output and from step
t + 1), a_t = zeta (1 - z_t) + nu, g_t = (h_{t-1} - zeta c_t) z_t (1 - z_t) and
e_t = a_t (1 - c_t^2), only the recursion runs step by step:

    dp_t = dh_t (g_t + e_t),        dh_{t-1} = dh_t z_t + dp_t U

and the rest is vectorized over time:

    dU = sum_t dp_t^T h_{t-1},   d(W x_t) = dp_t,   db_z = sum_t dh_t g_t,   db_h = sum_t dh_t e_t
    dzeta = sum_t dh_t (1 - z_t) c_t,   dnu = sum_t dh_t c_t

``tests/test_fastgrnn.py`` checks it against autograd of the step-by-step formula.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class FastGRNNFunction(torch.autograd.Function):
    """(wx [B, T, H], U [H, H], b_z [H], b_h [H], zeta [], nu [], h0 [B, H]) -> h [B, T, H]
    with zeta, nu already through their sigmoid."""

    @staticmethod
    def forward(ctx, wx, u, b_z, b_h, zeta, nu, h0):
        base_z, base_c = (wx + b_z).unbind(1), (wx + b_h).unbind(1)
        u_t, keep = u.t(), zeta + nu
        h, hs, zs, cs = h0, [h0], [], []
        for t in range(wx.shape[1]):
            uh = h @ u_t
            z = torch.sigmoid(base_z[t] + uh)
            c = torch.tanh(base_c[t] + uh)
            h = torch.addcmul(keep * c, z, h - zeta * c)  # (zeta (1 - z) + nu) c + z h
            hs.append(h)
            zs.append(z)
            cs.append(c)
        hs_t = torch.stack(hs)  # [T + 1, B, H]
        ctx.save_for_backward(u, zeta, nu, hs_t, torch.stack(zs), torch.stack(cs))
        return hs_t[1:].transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, zeta, nu, hs, z, c = ctx.saved_tensors
        prev = hs[:-1]
        gate = (prev - zeta * c) * z * (1 - z)
        a = zeta * (1 - z) + nu
        cand = a * (1 - c * c)
        k = gate + cand
        g = grad_out.transpose(0, 1)
        dh, dhs, das = torch.zeros_like(hs[0]), [], []
        for t in range(z.shape[0] - 1, -1, -1):
            dh = dh + g[t]
            da = dh * k[t]
            dhs.append(dh)
            das.append(da)
            dh = torch.addmm(dh * z[t], da, u)
        dh_all, da_all = torch.stack(dhs[::-1]), torch.stack(das[::-1])
        hidden = u.shape[0]
        d_u = da_all.reshape(-1, hidden).t() @ prev.reshape(-1, hidden)
        d_bz = (dh_all * gate).sum((0, 1))
        d_bh = (dh_all * cand).sum((0, 1))
        d_zeta = (dh_all * (1 - z) * c).sum().reshape(zeta.shape)
        d_nu = (dh_all * c).sum().reshape(nu.shape)
        return da_all.transpose(0, 1), d_u, d_bz, d_bh, d_zeta, d_nu, dh


def fastgrnn_recurrence(
    x: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    b_z: torch.Tensor,
    b_h: torch.Tensor,
    zeta: torch.Tensor,
    nu: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, I] -> (h [B, T, H], h_T [B, H]); ``zeta``, ``nu`` are the raw scalars (a sigmoid
    is applied here). Computes in x's dtype."""
    dtype = x.dtype
    w, u, b_z, b_h = (t.to(dtype) for t in (w, u, b_z, b_h))
    zeta, nu = torch.sigmoid(zeta).to(dtype), torch.sigmoid(nu).to(dtype)
    if h0 is None:
        h0 = x.new_zeros(x.shape[0], u.shape[0])
    wx = x @ w.t()
    out = FastGRNNFunction.apply(wx, u, b_z, b_h, zeta.reshape(()), nu.reshape(()), h0)
    return out, out[:, -1]
