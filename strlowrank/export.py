"""Exports that make sparse and low-rank models faster at inference (issue #7).

Low-rank GRU (``export_gru``): a TorchScript module. With W = A_W B_W [3H, I] and
U = A_U B_U [3H, H] (rank r, ``RNNLayer.export``), the input projection of all T steps is one
matmul, x B_W^T A_W^T + b_ih, and each step costs two thin products (h B_U^T) A_U^T + b_hh
(r (I + 3H) instead of 3H I MACs) and the gate arithmetic of torch's GRU:

    r, z = sigmoid(gi_rz + gh_rz),   n = tanh(gi_n + r * gh_n),   h' = n + z (h - n)

A matrix whose factors cost more than its dense form is stored dense.

Sparse CNN (``export_sparse_cnn``): conv (groups 1) and linear layers whose weights are sparse
are replaced by a CSR sparse x dense product (1x1 convs directly on [C, H W], k x k convs on
unfolded patches, linear layers on x^T), but only where timing that layer on its real input
shape says the sparse product is faster; every other layer stays dense. BatchNorm and the rest
of the graph are untouched, so outputs equal the pruned model's within float rounding.

``file_bytes`` gives the size on disk of what ``save_export`` writes.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from strlowrank.rnn import RNNLayer

# --------------------------------------------------------------------------- low-rank GRU


class LowRankGRU(nn.Module):
    """A batch-first single-layer GRU over (possibly) factorized W and U, for TorchScript.

    Buffers: w_a [3H, r_W] and w_b [r_W, I] (or w_a = W [3H, I] and w_b empty when W is dense),
    the same for U, biases [3H]. forward: x [B, T, I], h0 [B, H] or None -> (out [B, T, H], h_T).
    """

    def __init__(self, w: tuple[torch.Tensor, torch.Tensor], u: tuple[torch.Tensor, torch.Tensor],
                 bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        self.hidden_size = int(bias_ih.shape[0] // 3)
        self.w_factored, w_a, w_b = _cheapest(*w)
        self.u_factored, u_a, u_b = _cheapest(*u)
        self.register_buffer("w_at", w_a.t().contiguous())  # [r, 3H] or [I, 3H]
        self.register_buffer("w_bt", w_b.t().contiguous())  # [I, r] or empty
        self.register_buffer("u_at", u_a.t().contiguous())
        self.register_buffer("u_bt", u_b.t().contiguous())
        self.register_buffer("bias_ih", bias_ih.detach().clone())
        self.register_buffer("bias_hh", bias_hh.detach().clone())

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        batch, steps, hid = x.shape[0], x.shape[1], self.hidden_size
        xt = x.transpose(0, 1).reshape(steps * batch, x.shape[2])
        if self.w_factored:
            xt = torch.mm(xt, self.w_bt)
        gi = torch.addmm(self.bias_ih, xt, self.w_at).view(steps, batch, 3 * hid)
        h = x.new_zeros(batch, hid) if h0 is None else h0
        outs = torch.empty(steps, batch, hid, dtype=x.dtype, device=x.device)
        for t in range(steps):
            hu = torch.mm(h, self.u_bt) if self.u_factored else h
            gh = torch.addmm(self.bias_hh, hu, self.u_at)
            g = gi[t]
            rz = torch.sigmoid(g[:, : 2 * hid] + gh[:, : 2 * hid])
            n = torch.tanh(torch.addcmul(g[:, 2 * hid :], rz[:, :hid], gh[:, 2 * hid :]))
            h = torch.addcmul(n, rz[:, hid:], h - n)
            outs[t] = h
        return outs.transpose(0, 1), h


def _cheapest(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(factored?, A, B): keep A [out, r] B [r, in] when r (out + in) < out in, else (W, empty)."""
    a, b = a.detach().float(), b.detach().float()
    out_f, rank, in_f = a.shape[0], a.shape[1], b.shape[1]
    if rank * (out_f + in_f) < out_f * in_f:
        return True, a, b
    return False, a @ b, a.new_zeros(in_f, 0)


def export_gru(layer: RNNLayer | nn.GRU, script: bool = True) -> nn.Module:
    """The fastest honest inference form of one GRU layer: a scripted ``LowRankGRU``.

    ``layer`` is an ``RNNLayer`` (full, lowrank or str matrices, exported at their learned
    ranks by ``RNNLayer.export``) or a single-layer batch-first ``nn.GRU``. Outputs equal the
    layer's (out [B, T, H], h_T [B, H]) within float rounding.
    """
    if isinstance(layer, nn.GRU):
        if not layer.batch_first:
            raise ValueError("export_gru: nn.GRU must be batch_first")
        layer = RNNLayer.from_torch(layer)
    if layer.cell != "gru":
        raise ValueError(f"export_gru: only GRU cells are supported, got {layer.cell!r}")
    compact = layer.export()
    factors = [m.factors() for m in (compact.W, compact.U)]
    module = LowRankGRU(*factors, compact.bias_ih, compact.bias_hh).eval()
    if not script:
        return module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.script is deprecated"
        return torch.jit.script(module)


# --------------------------------------------------------------------------- sparse CNN


class SparseConv2d(nn.Module):
    """A conv (groups 1) as CSR W [C_out, C_in k k] times patches; 1x1 convs skip the unfold."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d needs groups=1 and numeric padding")
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.out_channels = conv.out_channels
        self.register_buffer("weight", _csr(conv.weight.detach().flatten(1)))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size, self.stride, self.padding, self.dilation)  # fmt: skip
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw, ph, pw) == (1, 1, 0, 0):
            cols = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
            cols = cols.reshape(batch, x.shape[1], out_h * out_w)
        else:
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out = torch.stack([self.weight @ cols[i] for i in range(batch)])
        out = out.view(batch, self.out_channels, out_h, out_w)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored CSR [out, in]: computed as (W x^T)^T."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", _csr(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (self.weight @ x.reshape(-1, x.shape[-1]).t()).t()
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


def _csr(w: torch.Tensor) -> torch.Tensor:
    """A 2-d float tensor as CSR with int32 indices (smaller on disk, same MKL product)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        c = w.float().contiguous().to_sparse_csr()
        return torch.sparse_csr_tensor(
            c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32), c.values(),
            c.shape)  # fmt: skip


@dataclass
class LayerChoice:
    """One candidate layer of ``export_sparse_cnn``: its timings (ms) and the chosen path."""

    name: str
    kind: str
    shape: str
    input_shape: str
    sparsity: float
    dense_ms: float
    sparse_ms: float
    sparse: bool


def best_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Fastest wall time of ``fn()`` in milliseconds, after ``warmup`` calls (the minimum is
    the estimate least disturbed by other processes on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def _bake(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every parametrization (STR, masks) baked into plain tensors.

    ``remove_parametrizations`` on a deepcopy would edit the parametrized class that the copy
    shares with ``model`` (and break ``model``), so the copy's modules are restored by hand.
    """
    baked = {
        (name, t): getattr(m, t).detach().clone()
        for name, m in model.named_modules() if parametrize.is_parametrized(m)
        for t in m.parametrizations
    }  # fmt: skip
    model = copy.deepcopy(model).eval()
    for (name, t), value in baked.items():
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module):
            module.__class__ = type(module).__bases__[0]  # the original, unparametrized class
            del module._modules["parametrizations"]
        setattr(module, t, nn.Parameter(value, requires_grad=False))
    return model


def _inputs(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The input each named module receives in one forward pass on ``example``."""
    seen: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
        for n in names
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def export_sparse_cnn(
    model: nn.Module,
    example: torch.Tensor,
    min_sparsity: float = 0.5,
    margin: float = 0.9,
    repeats: int = 5,
) -> tuple[nn.Module, list[LayerChoice]]:
    """Replace sparse conv/linear layers by CSR products where timing says they are faster.

    Args:
        model: a pruned CNN (STR / mask parametrizations are baked into a copy first).
        example: an input of the batch size and image size to optimize for.
        min_sparsity: layers with fewer zeros stay dense without timing.
        margin: a layer goes sparse when sparse_ms < margin * dense_ms (timing noise guard).
        repeats: timed calls per layer and path (fastest, after one warm-up call).
    Returns:
        (the exported model in eval mode, one ``LayerChoice`` per timed layer).
    """
    model = _bake(model)
    candidates = {
        n: m for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                        and not isinstance(m.padding, str))
    }  # fmt: skip
    inputs = _inputs(model, example, list(candidates))
    choices = []
    with torch.no_grad():
        for name, module in candidates.items():
            sparsity = 1.0 - float(torch.count_nonzero(module.weight)) / module.weight.numel()
            if sparsity >= min_sparsity and name in inputs:
                choice, sparse = _time_layer(name, module, inputs[name], sparsity, repeats)
                choice.sparse = choice.sparse_ms < margin * choice.dense_ms
                choices.append(choice)
                if choice.sparse:
                    _set_submodule(model, name, sparse)
    return model, choices


def _time_layer(
    name: str, module: nn.Module, x: torch.Tensor, sparsity: float, repeats: int
) -> tuple[LayerChoice, nn.Module]:
    """Time ``module`` and its CSR replacement on ``x``; (the timings, the replacement)."""
    sparse = SparseLinear(module) if isinstance(module, nn.Linear) else SparseConv2d(module)
    dense_ms = best_ms(lambda: module(x), repeats)
    sparse_ms = best_ms(lambda: sparse(x), repeats)
    choice = LayerChoice(
        name, type(module).__name__, "x".join(map(str, module.weight.shape)),
        "x".join(map(str, x.shape)), sparsity, dense_ms, sparse_ms, False)  # fmt: skip
    return choice, sparse


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --------------------------------------------------------------------------- files


def save_export(model: nn.Module, path: str | Path | None = None) -> int:
    """Write an exported model (TorchScript via ``torch.jit.save``, else its state_dict via
    ``torch.save``; CSR weights stay CSR) to ``path`` (or memory); returns the bytes written."""
    buffer = io.BytesIO()
    if isinstance(model, torch.jit.ScriptModule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.save is deprecated"
            torch.jit.save(model, buffer)
    else:
        torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return len(data)


def file_bytes(model: nn.Module) -> int:
    """Size on disk of ``save_export(model)``."""
    return save_export(model)
