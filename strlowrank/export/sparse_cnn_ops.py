"""Building blocks of ``strlowrank.export.export_sparse_cnn``: CSR convolutions, BN folding and
a oneDNN max-pool (benchmark P4).

BatchNorm folding (``fold_batchnorm_``). In eval mode a BN after a conv is an affine map per
output channel, so with s = gamma / sqrt(running_var + eps)

    BN(W * x + b) = (s W) * x + s (b - running_mean) + beta,

i.e. each row of W is scaled by s (its zero pattern is unchanged) and the conv gets a bias;
the BN becomes ``nn.Identity``. Conv -> BN pairs are found on the ``torch.fx`` graph (the BN's
only input is the conv's output, which nothing else reads, and neither module is called twice);
a model that fx cannot trace falls back to adjacent (Conv2d, BatchNorm2d) pairs in plain
``nn.Sequential`` containers (not subclasses, whose forward may differ).

CSR convolution (``SparseConv2d``), one sample x [C_in, H, W] at a time, three paths:

* ``matmul`` (1x1 kernel, no padding): Y = W X + b with X = x (strided by the stride)
  viewed as [C_in, H_out W_out], one ``addmm`` (CSR W [C_out, C_in]).
* ``shift`` (any kernel, stride and dilation; no patch copy): with the zero-padded input cut
  into its s_h x s_w stride phases P_ab[c, i, j] = x_pad[c, s_h i + a, s_w j + b], each of
  size [C_in, H_q, W_q] and flattened to [C_in, H_q W_q], a kernel tap (ky, kx) at padded
  offset (py, px) = (ky d_h, kx d_w) reads phase (py mod s_h, px mod s_w) shifted by
  (py div s_h, px div s_w). In the flattened layout a 2-d shift is a 1-d offset
  o = (py div s_h) W_q + (px div s_w), so

      Y[:, i W_q + j] = b + sum_taps W_tap P_tap[:, o_tap + i W_q + j]

  is k_h k_w CSR products W_tap [C_out, C_in] x (a column window of P_tap, a strided view
  that MKL reads in place), accumulated by ``addmm_`` into one [C_out, H_out W_q] buffer; the
  W_q - W_out columns past each output row are junk and dropped by the final copy. Stride 1
  needs no phase copy at all (P = x_pad), stride 2 one copy of the padded input. Taps whose
  weights are all zero are skipped.
* ``cols``: the same windows concatenated into [k_h k_w C_in, H_out W_q] (an im2col by k_h k_w
  contiguous copies instead of ``F.unfold``) times one CSR [C_out, k_h k_w C_in]; fewer MKL
  calls, for few input channels.

``export_sparse_cnn`` times the applicable paths of each layer against the dense conv.

Max pooling (``MaxPool2dOneDNN``): torch's NCHW ``max_pool2d`` on CPU at one thread takes about
12 ms on ResNet-50's [1, 64, 112, 112] stem output; the oneDNN kernel, including the conversions
to and from its tensor format, takes under 1 ms and returns the same values.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn


def _csr(w: torch.Tensor) -> torch.Tensor:
    """A 2-d float tensor as CSR with int32 indices (smaller on disk, same MKL product)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        c = w.float().contiguous().to_sparse_csr()
        return torch.sparse_csr_tensor(
            c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32), c.values(), c.shape
        )


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------- CSR layers


class SparseConv2d(nn.Module):
    """A conv (groups 1, zero padding) as CSR products; ``mode`` is one of ``MODES``
    (default: ``matmul`` for 1x1 convs without padding, else ``shift``)."""

    MODES = ("matmul", "shift", "cols")

    def __init__(self, conv: nn.Conv2d, mode: str | None = None) -> None:
        super().__init__()
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("SparseConv2d needs groups=1 and numeric zero padding")
        self.kernel_size, self.stride = _pair(conv.kernel_size), _pair(conv.stride)
        self.padding, self.dilation = _pair(conv.padding), _pair(conv.dilation)
        self.out_channels = conv.out_channels
        pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        self.mode = mode or ("matmul" if pointwise else "shift")
        if self.mode not in self.MODES or (self.mode == "matmul" and not pointwise):
            raise ValueError(f"mode {self.mode!r} does not apply to {conv}")
        w = conv.weight.detach().float()
        bias = torch.zeros(w.shape[0]) if conv.bias is None else conv.bias.detach().float()
        self.register_buffer("bias", bias.clone().view(-1, 1))  # [C_out, 1], broadcast by addmm
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        # Per tap: (buffer name, phase row, phase col, shift rows, shift cols) in phase units.
        self.taps: list[tuple[str, int, int, int, int]] = []
        for ky in range(kh):
            for kx in range(kw):
                py, px = ky * dh, kx * dw
                name = f"weight_{ky}_{kx}"
                self.taps.append((name, py % sh, px % sw, py // sh, px // sw))
                if self.mode == "shift" and bool(w[:, :, ky, kx].any()):
                    self.register_buffer(name, _csr(w[:, :, ky, kx]))
        if self.mode == "shift":
            self.taps = [t for t in self.taps if hasattr(self, t[0])]
        elif self.mode == "matmul":
            self.register_buffer("weight", _csr(w.flatten(1)))
        else:  # columns in tap-major order (ky, kx, c), the order of the concatenated windows
            self.register_buffer("weight", _csr(w.permute(0, 2, 3, 1).flatten(1)))
        self.max_shift = ((kh - 1) * dh // sh, (kw - 1) * dw // sw)

    def _out_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (
            width + 2 * pw - dw * (kw - 1) - 1
        ) // sw + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[0], x.shape[1]
        out_h, out_w = self._out_size(x.shape[2], x.shape[3])
        if self.mode == "matmul":
            sh, sw = self.stride
            cols = (x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x).reshape(
                batch, channels, out_h * out_w
            )
            if batch == 1:
                out = torch.addmm(self.bias, self.weight, cols[0])
                return out.view(1, self.out_channels, out_h, out_w)
            out = x.new_empty(batch, self.out_channels, out_h * out_w)
            for i in range(batch):
                torch.addmm(self.bias, self.weight, cols[i], out=out[i])
            return out.view(batch, self.out_channels, out_h, out_w)
        phases, row = self._phases(x, out_h, out_w)
        length = out_h * row
        if batch == 1:
            y = self._product(phases[0], row, length)
            return y.view(1, self.out_channels, out_h, row)[:, :, :, :out_w].contiguous()
        out = x.new_empty(batch, self.out_channels, out_h, out_w)
        for i in range(batch):
            y = self._product(phases[i], row, length)
            out[i] = y.view(self.out_channels, out_h, row)[:, :, :out_w]
        return out

    def _phases(self, x: torch.Tensor, out_h: int, out_w: int) -> tuple[torch.Tensor, int]:
        """The padded input as stride phases [N, s_h, s_w, C, H_q W_q] (a view for stride 1)
        and the phase row length W_q; H_q has one spare row so that every window fits."""
        (sh, sw), (ph, pw), (my, mx) = self.stride, self.padding, self.max_shift
        rows, row = out_h + my + (1 if mx else 0), out_w + mx
        height, width = x.shape[2], x.shape[3]
        # Negative right / bottom pads crop input that no output reads.
        xp = F.pad(x, (pw, row * sw - width - pw, ph, rows * sh - height - ph))
        batch, channels = x.shape[0], x.shape[1]
        if (sh, sw) == (1, 1):
            return xp.view(batch, 1, 1, channels, rows * row), row
        xp = xp.view(batch, channels, rows, sh, row, sw).permute(0, 3, 5, 1, 2, 4)
        return xp.reshape(batch, sh, sw, channels, rows * row), row

    def _product(self, phases: torch.Tensor, row: int, length: int) -> torch.Tensor:
        """[C_out, length] = b + sum over taps of W_tap x (window of its phase)."""
        windows = [
            (name, phases[a, b, :, dy * row + dx : dy * row + dx + length])
            for name, a, b, dy, dx in self.taps
        ]
        if self.mode == "cols":
            return torch.addmm(self.bias, self.weight, torch.cat([w for _, w in windows]))
        if not windows:
            return self.bias.expand(self.out_channels, length)
        name, window = windows[0]
        y = torch.addmm(self.bias, getattr(self, name), window)
        for name, window in windows[1:]:
            y.addmm_(getattr(self, name), window)
        return y


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored CSR [out, in]: computed as (b + W x^T)^T."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        bias = torch.zeros(w.shape[0]) if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("weight", _csr(w))
        self.register_buffer("bias", bias.clone().view(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, self.weight, x.reshape(-1, x.shape[-1]).t()).t()
        return out.reshape(*x.shape[:-1], out.shape[-1])


# --------------------------------------------------------------------------- graph rewrites


class MaxPool2dOneDNN(nn.Module):
    """``nn.MaxPool2d`` through oneDNN on CPU float32 inputs without autograd (same values);
    anything else goes to ``F.max_pool2d``."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        if pool.return_indices:
            raise ValueError("MaxPool2dOneDNN does not return indices")
        self.kernel_size = list(_pair(pool.kernel_size))
        self.stride = list(_pair(pool.stride if pool.stride is not None else pool.kernel_size))
        self.padding, self.dilation = list(_pair(pool.padding)), list(_pair(pool.dilation))
        self.ceil_mode = pool.ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or x.dim() != 4
            or (x.requires_grad and torch.is_grad_enabled())
        ):
            return F.max_pool2d(
                x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
            )
        y = torch.mkldnn_max_pool2d(
            x.contiguous().to_mkldnn(),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
        )
        return y.to_dense()


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for every BatchNorm2d whose only input is a Conv2d output that
    nothing else reads (see the module docstring)."""
    mods = dict(model.named_modules())
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # untraceable forward: adjacent pairs in Sequential containers
        return [
            (f"{name}.{a}" if name else a, f"{name}.{b}" if name else b)
            for name, m in mods.items()
            if type(m) is nn.Sequential
            for (a, ma), (b, mb) in zip(m.named_children(), list(m.named_children())[1:])
            if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d)
        ]
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm2d with running statistics into the conv before it, in
    place (the BN becomes ``nn.Identity``); returns the folded (conv, BN) names.

    ``model`` must be in eval mode and free of parametrizations (``export.bake``)."""
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.training or bn.running_mean is None or bn.running_var is None:
            continue
        mean, var = bn.running_mean.float(), bn.running_var.float()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -mean * scale if bn.bias is None else bn.bias.float() - mean * scale
        weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.float() * scale + shift
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        _set_submodule(model, bn_name, nn.Identity())
        folded.append((conv_name, bn_name))
    return folded


def use_onednn_maxpool_(model: nn.Module) -> int:
    """Replace every ``nn.MaxPool2d`` (without indices) by ``MaxPool2dOneDNN``, in place;
    returns how many. A no-op where oneDNN is not available."""
    if not torch.backends.mkldnn.is_available():
        return 0
    names = [
        n for n, m in model.named_modules() if type(m) is nn.MaxPool2d and not m.return_indices
    ]
    for name in names:
        _set_submodule(model, name, MaxPool2dOneDNN(model.get_submodule(name)))
    return len(names)


def simplify_cnn(model: nn.Module, fold_bn: bool = True, fast_pool: bool = True) -> nn.Module:
    """An eval-mode copy of a plain (unparametrized) CNN with BN folded and max-pools on
    oneDNN: the dense reference of what ``export_sparse_cnn`` does besides sparsity."""
    model = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm_(model)
    if fast_pool:
        use_onednn_maxpool_(model)
    return model
