"""A compiled CPU inference path for the exported low-rank GRU, and its eager reference.

``lowrank_gru_forward`` is the recurrence in ATen ops: ``LowRankGRU.forward``
(``strlowrank.export``, the eager export) and ``CompiledLowRankGRU``'s fallback both call it.
It runs about eleven small ATen ops per time step, and at H = 128 their dispatch and the
unfused gate arithmetic cost more than the two thin products. Here one C++ operator
(``csrc/lowrank_gru.cpp`` in this package, built at first use with
``torch.utils.cpp_extension.load_inline``, an op registered with ``TORCH_LIBRARY``, torch's
operator registry, so no pybind11 and no Python headers) runs the whole time loop:

    gi[t] = x_t B_W^T A_W^T + b_ih + [b_hr, b_hz, 0]       (blocks of steps, one matmul each)
    gh    = (h B_U^T) A_U^T                                  (two ``at::mm_out``, fixed buffers)
    r, z  = sigmoid(gi_rz + gh_rz)
    n     = tanh(gi_n + r (gh_n + b_hn))
    h'    = n + z (h - n)                                    (one fused pass over B x H)

The b_hh of the r and z gates is folded into the input bias; only b_hn stays inside r (.),
as in torch's GRU. The input projection is computed a block of steps at a time into a buffer
small enough to stay in cache (a [T B, 3H] tensor at H = 512, B = 64 would be 39 MB), and each
h' is written straight into out[:, t] (batch-first), whose rows are the next step's h.
A dense W or U (``LowRankGRU`` keeps a matrix dense when its factors cost more) skips the
first thin product. At batch 1 (and 2 while U's factors fit in L2) the two products are not
``at::mm_out`` calls but per-row vector-matrix loops whose accumulators stay in registers, and
h_{t-1} is addressed by pointer: at H = 128 the per-step dispatch of two GEMMs and a tensor
view cost more than the products themselves (16 K MACs at r = 32).
The gate pass uses its own exp (Cephes-style range reduction and a degree-6 polynomial,
about 2 ulp) written so that gcc vectorizes it at -O3
-fno-trapping-math (needed to if-convert the clamps) without -ffast-math (whose reassociation
breaks the exp's rounding trick; libm's expf/tanhf vectorize only under -ffast-math and were
no faster); sigmoid(a) = 1 / (1 + e^-a),
tanh(a) = 1 - 2 / (e^(2a) + 1) (absolute error about 1e-7). Outputs match torch's GRU
within 1e-6 (max abs, T = 99).

Compiled with ``_FLAGS`` (-O3 -march=native ...) into ``cache_root()/torch_ext``, in a folder
named by a hash of the source file's text (an edited source builds anew), the flags, torch's
version and the CPU's instruction-set flags, with ``strlowrank.method.cache.build_once`` (concurrent
processes compile once, a killed compile is redone); nothing is compiled at import time.
``available()`` says whether the build works (``unavailable_reason()`` says why not).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from strlowrank.method.cache import build_once, cache_root

_NAME = "strlowrank_gru"
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno"]

_SOURCE = Path(__file__).parent / "csrc" / "lowrank_gru.cpp"  # package data (pyproject.toml)

_state: dict[str, object] = {"loaded": False, "error": None}


def source() -> str:
    """The C++ source of the op (``csrc/lowrank_gru.cpp``), read at build time."""
    return _SOURCE.read_text(encoding="utf-8")


def cache_dir() -> Path:
    """The build folder: ``$STRLOWRANK_CACHE/torch_ext/<name>_<hash of source, flags, torch,
    CPU flags>`` (``-march=native`` binaries must not be shared across CPU kinds)."""
    key = "\n".join([source(), *_FLAGS, torch.__version__, platform.machine(), _cpu_flags()])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_root() / "torch_ext" / f"{_NAME}_{digest}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning
    (irrelevant here: the extension is CPU-only)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _missing_tool() -> str | None:
    cpp_extension = _cpp_extension()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found; set CXX)"
    if shutil.which("ninja") is None:  # pip's ninja in a virtualenv that is not activated
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _compile(folder: Path) -> None:
    """Compile the extension in folder (and load it into this process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the build's compiler-version notes
        _cpp_extension().load_inline(
            _NAME,
            cpp_sources=[source()],
            extra_cflags=_FLAGS,
            build_directory=str(folder),
            is_python_module=False,
            no_implicit_headers=True,
            verbose=False,
        )
    _state["loaded"] = True


def _load() -> None:
    """Build (or reuse) and load the extension once per process; failures are remembered."""
    if _state["loaded"] or _state["error"] is not None:
        return
    reason = _missing_tool()
    if reason is None:
        try:
            build = build_once(cache_dir(), _compile)
            if not _state["loaded"]:  # compiled by another process (or an earlier one)
                torch.ops.load_library(str(build / f"{_NAME}.so"))
                _state["loaded"] = True
            _state["op"] = torch.ops.strlowrank_gru.forward
            return
        except Exception as exc:  # compiler errors, missing headers, link errors, ...
            lines = [s.strip() for s in str(exc).splitlines() if s.strip()] or [""]
            first_error = next((s for s in lines if "error:" in s), lines[0])  # compiler's
            reason = f"building the C++ extension failed ({type(exc).__name__}): {first_error}"
    _state["error"] = reason


def available() -> bool:
    """Whether the compiled GRU can be used here (builds it on the first call: ~15-30 s)."""
    _load()
    return bool(_state["loaded"])


def unavailable_reason() -> str | None:
    """One line on why ``available()`` is False (None when it is True or not yet asked)."""
    return _state["error"]  # type: ignore[return-value]


def gru_forward(
    x: torch.Tensor,
    h0: torch.Tensor | None,
    weights: tuple[torch.Tensor, ...],
    w_factored: bool,
    u_factored: bool,
    block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled op: weights = (w_at, w_bt, u_at, u_bt, bias_ih, bias_hh) as in
    ``LowRankGRU``; block = steps per input-projection block (0: auto)."""
    if not available():
        raise RuntimeError(f"strlowrank.export.gru_cpp is unavailable: {unavailable_reason()}")
    return torch.ops.strlowrank_gru.forward(x, h0, *weights, w_factored, u_factored, block)


def lowrank_gru_forward(
    x: torch.Tensor,
    h0: torch.Tensor | None,
    w_at: torch.Tensor,
    w_bt: torch.Tensor,
    u_at: torch.Tensor,
    u_bt: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    w_factored: bool,
    u_factored: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled op's recurrence in ATen ops (any device, autograd works).

    x [B, T, I], h0 [B, H] or None -> (out [B, T, H], h_T [B, H]); weights as in
    ``LowRankGRU``: w_at [r_W, 3H] and w_bt [I, r_W] (w_at = W^T [I, 3H] when W is dense), the
    same for U, biases [3H]. gi = (x B_W^T) A_W^T + b_ih for all T steps in one product, then
    per step gh = (h B_U^T) A_U^T + b_hh and torch's GRU gates.
    """
    batch, steps, hid = x.shape[0], x.shape[1], bias_ih.shape[0] // 3
    xt = x.transpose(0, 1).reshape(steps * batch, x.shape[2])
    if w_factored:
        xt = torch.mm(xt, w_bt)
    gi = torch.addmm(bias_ih, xt, w_at).view(steps, batch, 3 * hid)
    h = x.new_zeros(batch, hid) if h0 is None else h0
    outs = torch.empty(steps, batch, hid, dtype=x.dtype, device=x.device)
    for t in range(steps):
        hu = torch.mm(h, u_bt) if u_factored else h
        gh = torch.addmm(bias_hh, hu, u_at)
        g = gi[t]
        rz = torch.sigmoid(g[:, : 2 * hid] + gh[:, : 2 * hid])
        n = torch.tanh(torch.addcmul(g[:, 2 * hid :], rz[:, :hid], gh[:, 2 * hid :]))
        h = torch.addcmul(n, rz[:, hid:], h - n)
        outs[t] = h
    return outs.transpose(0, 1), h


class CompiledLowRankGRU(nn.Module):
    """``LowRankGRU``'s buffers run by the compiled op: x [B, T, I] (batch-first), h0 [B, H] or
    None -> (out [B, T, H], h_T [B, H]).

    The op takes float32 CPU inputs without autograd; inputs on another device (after
    ``.to(device)``) or needing gradients go through ``lowrank_gru_forward`` instead.
    """

    _names = ("w_at", "w_bt", "u_at", "u_bt", "bias_ih", "bias_hh")

    def __init__(self, gru: nn.Module) -> None:
        """``gru``: a ``LowRankGRU`` (``export_gru(layer)``)."""
        super().__init__()
        if not available():
            raise RuntimeError(f"CompiledLowRankGRU: {unavailable_reason()}")
        self.hidden_size = int(gru.hidden_size)
        self.w_factored, self.u_factored = bool(gru.w_factored), bool(gru.u_factored)
        for name in self._names:
            self.register_buffer(name, getattr(gru, name).detach().float().contiguous().clone())

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.is_grad_enabled() and (
            x.requires_grad or (h0 is not None and h0.requires_grad)
        )
        # buffers read from the dict (not six nn.Module.__getattr__ calls): a streaming call per
        # 10 ms frame spends most of its time outside the op
        buffers = self._buffers
        weights = [buffers[n] for n in self._names]
        if x.device.type != "cpu" or grad:
            return lowrank_gru_forward(x, h0, *weights, self.w_factored, self.u_factored)
        return _state["op"](x, h0, *weights, self.w_factored, self.u_factored, 0)

    def step(self, x_t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame of a stream: x_t [B, I], h [B, H] -> (y_t [B, H], h' [B, H]), y_t = h'."""
        out, h_next = self.forward(x_t.unsqueeze(1), h)
        return out[:, 0], h_next

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, w_factored={self.w_factored}, "
            f"u_factored={self.u_factored}"
        )
