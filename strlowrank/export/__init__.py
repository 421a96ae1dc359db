"""Exports that make sparse and low-rank models faster at inference.

Low-rank GRU (``export_gru``): an eager PyTorch module (``backend="eager"``) or the same math
as one compiled C++ op with fused gates (``backend="cpp"``, ``strlowrank.export.gru_cpp``); a file
that loads without this repo is the ONNX graph (``export_onnx``). With
W = A_W B_W [3H, I] and U = A_U B_U [3H, H] (rank r, ``RNNLayer.export``), the input
projection of all T steps is one matmul, x B_W^T A_W^T + b_ih, and each step costs two thin
products (h B_U^T) A_U^T + b_hh (r (I + 3H) instead of 3H I MACs) and the gate arithmetic
of torch's GRU:

    r, z = sigmoid(gi_rz + gh_rz),   n = tanh(gi_n + r * gh_n),   h' = n + z (h - n)

A matrix whose factors cost more than its dense form is stored dense.

Sparse CNN (``export_sparse_cnn``, kernels in ``strlowrank.export.sparse_cnn_ops``): every eval-mode
BatchNorm is first folded into the conv before it (rows of W scaled, a bias added; zero
patterns unchanged) and max-pools run through oneDNN. Then conv (groups 1) and linear layers
whose weights are sparse are replaced by CSR sparse x dense products (1x1 convs directly on
[C, H W]; k x k convs as per-tap products on shifted windows of the padded input accumulated
in place, or one product on the concatenated windows; linear layers on x^T), but only where
timing that layer on its real input shape says the fastest CSR path beats the dense layer;
every other layer stays dense (with its BN folded). Residual adds, ReLUs and pooling are
untouched, so outputs equal the pruned model's within float rounding.

ONNX (``export_onnx``, graphs in ``strlowrank.export.onnx_export``): a GRU layer as an ONNX ``Scan``
over time whose step keeps the factors as two MatMuls (or ONNX's dense ``GRU`` op, the
baseline); a pruned CNN with its thresholds baked and BN folded, weights dense with zeros.

Streaming: ``forward(x_chunk, h)`` returns the last state, so a stream is a sequence of calls
each passing the previous call's h; ``step(x_t, h)`` is the one-frame call. Chunked calls
give the whole-sequence outputs (the recurrence is the same arithmetic, step by step).

``save_export`` writes an exported module's state_dict, or an ONNX graph's bytes;
``file_bytes`` gives the size on disk of what it writes.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from strlowrank.export import gru_cpp
from strlowrank.export.gru_cpp import lowrank_gru_forward
from strlowrank.export.sparse_cnn_ops import (
    SparseConv2d,
    SparseLinear,
    _set_submodule,
    fold_batchnorm_,
    use_onednn_maxpool_,
)
from strlowrank.export.timing import interleaved
from strlowrank.method.lowrank import factored_is_cheaper
from strlowrank.method.rnn import RNNLayer

if TYPE_CHECKING:
    import onnx

# --------------------------------------------------------------------------- low-rank GRU


class LowRankGRU(nn.Module):
    """A batch-first single-layer GRU over (possibly) factorized W and U (eager inference).

    Buffers: w_a [3H, r_W] and w_b [r_W, I] (or w_a = W [3H, I] and w_b empty when W is dense),
    the same for U, biases [3H]. forward: x [B, T, I], h0 [B, H] or None -> (out [B, T, H], h_T).
    """

    def __init__(
        self,
        w: tuple[torch.Tensor, torch.Tensor],
        u: tuple[torch.Tensor, torch.Tensor],
        bias_ih: torch.Tensor,
        bias_hh: torch.Tensor,
    ) -> None:
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
        return lowrank_gru_forward(
            x,
            h0,
            self.w_at,
            self.w_bt,
            self.u_at,
            self.u_bt,
            self.bias_ih,
            self.bias_hh,
            self.w_factored,
            self.u_factored,
        )

    def step(self, x_t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame of a stream: x_t [B, I], h [B, H] -> (y_t [B, H], h' [B, H]), y_t = h'."""
        out, h_next = self.forward(x_t.unsqueeze(1), h)
        return out[:, 0], h_next


def _cheapest(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(factored?, A, B): A [out, r], B [r, in] if ``factored_is_cheaper``, else (W, empty)."""
    a, b = a.detach().float(), b.detach().float()
    out_f, rank, in_f = a.shape[0], a.shape[1], b.shape[1]
    if factored_is_cheaper(rank, out_f, in_f):
        return True, a, b
    return False, a @ b, a.new_zeros(in_f, 0)


def export_gru(layer: RNNLayer | nn.GRU, backend: str = "eager") -> nn.Module:
    """The fastest honest inference form of one GRU layer.

    ``layer`` is an ``RNNLayer`` (full, lowrank or str matrices, exported at their learned
    ranks by ``RNNLayer.export``) or a single-layer batch-first ``nn.GRU``. Outputs equal the
    layer's (out [B, T, H], h_T [B, H]) within float rounding.

    backend: ``"eager"``: a ``LowRankGRU`` (any device, autograd works); ``"cpp"``: a
    ``strlowrank.export.gru_cpp.CompiledLowRankGRU`` (the whole time loop in one C++ op, built at
    first use; CPU float32 inference), RuntimeError if it cannot be built here. For a file
    that runs without this repo, export the layer to ONNX (``export_onnx``).
    """
    if backend not in ("eager", "cpp"):
        raise ValueError(f"export_gru: backend must be 'eager' or 'cpp', got {backend!r}")
    if isinstance(layer, nn.GRU):
        if not layer.batch_first:
            raise ValueError("export_gru: nn.GRU must be batch_first")
        layer = RNNLayer.from_torch(layer)
    if layer.cell != "gru":
        raise ValueError(f"export_gru: only GRU cells are supported, got {layer.cell!r}")
    if layer.split != "stacked":  # the kernels take one factor pair per side
        raise ValueError(
            "export_gru: per-gate layers are not supported (stacked W, U only); "
            "use RNNLayer.export() for a compact PyTorch layer"
        )
    compact = layer.export()
    factors = [m.factors() for m in (compact.W, compact.U)]
    module = LowRankGRU(*factors, compact.bias_ih, compact.bias_hh).eval()
    if backend == "cpp":
        if not gru_cpp.available():
            raise RuntimeError(f"export_gru(backend='cpp'): {gru_cpp.unavailable_reason()}")
        return gru_cpp.CompiledLowRankGRU(module).eval()
    return module


# --------------------------------------------------------------------------- sparse CNN


@dataclass
class LayerChoice:
    """One candidate layer of ``export_sparse_cnn``: its timings (ms) and the chosen path.

    ``sparse_ms`` is the fastest CSR path, ``path`` the one chosen ("dense" or a
    ``SparseConv2d`` mode: "matmul", "shift", "cols"; "linear" for ``SparseLinear``)."""

    name: str
    kind: str
    shape: str
    input_shape: str
    sparsity: float
    dense_ms: float
    sparse_ms: float
    sparse: bool
    path: str = "dense"


def bake(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every parametrization (STR, masks) baked into plain tensors.

    ``remove_parametrizations`` on a deepcopy would edit the parametrized class that the copy
    shares with ``model`` (and break ``model``), so the copy's modules are restored by hand.
    """
    baked = {
        (name, t): getattr(m, t).detach().clone()
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m)
        for t in m.parametrizations
    }
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
    fold_bn: bool = True,
    fast_pool: bool = True,
) -> tuple[nn.Module, list[LayerChoice]]:
    """Replace sparse conv/linear layers by CSR products where timing says they are faster.

    Args:
        model: a pruned CNN (STR / mask parametrizations are baked into a copy first).
        example: an input of the batch size and image size to optimize for.
        min_sparsity: layers with fewer zeros stay dense without timing.
        margin: a layer goes sparse when sparse_ms < margin * dense_ms (timing noise guard).
        repeats: timed calls per layer and path (fastest, after one warm-up call; the paths
            are timed interleaved).
        fold_bn: fold eval-mode BatchNorms into the convs before them first
            (``sparse_cnn_ops.fold_batchnorm_``; zero patterns are unchanged).
        fast_pool: run max-pools through oneDNN (``sparse_cnn_ops.MaxPool2dOneDNN``).
    Returns:
        (the exported model in eval mode, one ``LayerChoice`` per timed layer).
    """
    model = bake(model)
    if fold_bn:
        fold_batchnorm_(model)
    if fast_pool:
        use_onednn_maxpool_(model)
    candidates = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        or (
            isinstance(m, nn.Conv2d)
            and m.groups == 1
            and not isinstance(m.padding, str)
            and m.padding_mode == "zeros"
        )
    }
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
                else:
                    choice.path = "dense"
    return model, choices


def _time_layer(
    name: str, module: nn.Module, x: torch.Tensor, sparsity: float, repeats: int
) -> tuple[LayerChoice, nn.Module]:
    """Time ``module`` and its CSR replacements (every applicable ``SparseConv2d`` mode) on
    ``x``, interleaved; (the timings with the fastest CSR path, that replacement)."""
    if isinstance(module, nn.Linear):
        paths: dict[str, nn.Module] = {"linear": SparseLinear(module)}
    elif module.kernel_size == (1, 1) and module.padding in (0, (0, 0)):
        paths = {"matmul": SparseConv2d(module, "matmul")}
    else:
        paths = {mode: SparseConv2d(module, mode) for mode in ("shift", "cols")}
    modules = {"dense": module, **paths}
    times = interleaved({name: partial(m, x) for name, m in modules.items()}, repeats)
    ms = {name: min(ts) for name, ts in times.items()}  # fastest: least disturbed by load
    path = min(paths, key=ms.__getitem__)
    choice = LayerChoice(
        name,
        type(module).__name__,
        "x".join(map(str, module.weight.shape)),
        "x".join(map(str, x.shape)),
        sparsity,
        ms["dense"],
        ms[path],
        False,
        path,
    )
    return choice, paths[path]


# --------------------------------------------------------------------------- ONNX


def export_onnx(
    model: nn.Module,
    example: torch.Tensor | None = None,
    path: str | Path | None = None,
    form: str = "scan",
) -> onnx.ModelProto:
    """An ONNX graph of a GRU or FastGRNN layer or of a pruned CNN (written to ``path`` if given).

    GRU (``RNNLayer``, batch-first ``nn.GRU``, ``LowRankGRU`` or ``CompiledLowRankGRU``):
    inputs x [B, T, I], h0 [B, H]; outputs y [B, T, H], h_T [B, H]; ``form`` "scan" (the
    factors as two MatMuls per step inside an ONNX Scan) or "gru_op" (ONNX's GRU op on the
    dense matrices); ``example`` is not needed. CNN: STR / mask parametrizations baked, BN
    folded, traced on ``example`` (input "x", output "y", batch dimension dynamic).
    Needs the ``onnx`` package (imported here only, so the other exports work without it).
    """
    from strlowrank.export import onnx_export

    if isinstance(model, RNNLayer) and model.cell == "fastgrnn":
        proto = onnx_export.fastgrnn_graph(model)
        if path is not None:
            Path(path).write_bytes(proto.SerializeToString())
        return proto
    if isinstance(model, (RNNLayer, nn.GRU)):
        model = export_gru(model)
    if hasattr(model, "w_at") and hasattr(model, "u_factored"):  # LowRankGRU and its forms
        proto = onnx_export.gru_graph(model, form)
    else:
        if example is None:
            raise ValueError("export_onnx: a CNN needs an example input")
        model = bake(model)
        fold_batchnorm_(model)
        proto = onnx_export.cnn_graph(model, example)
    if path is not None:
        Path(path).write_bytes(proto.SerializeToString())
    return proto


# --------------------------------------------------------------------------- files


def save_export(model: nn.Module | onnx.ModelProto, path: str | Path | None = None) -> int:
    """Write an export to ``path`` (or memory) and return the bytes written: an ONNX graph
    (``export_onnx``) as its serialized bytes, a module as its state_dict (``torch.save``; CSR
    weights stay CSR; load it with ``torch.load(path, weights_only=True)``)."""
    if not isinstance(model, nn.Module):  # an onnx.ModelProto
        data = model.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return len(data)


def file_bytes(model: nn.Module | onnx.ModelProto) -> int:
    """Size on disk of ``save_export(model)``."""
    return save_export(model)
