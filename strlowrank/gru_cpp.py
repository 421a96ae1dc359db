"""A compiled CPU inference path for the exported low-rank GRU.

``LowRankGRU`` (``strlowrank.export``) runs about eleven small ATen ops per time step, and at
H = 128 their dispatch and the unfused gate arithmetic cost more than the two thin products.
Here one C++ operator (built at first use with ``torch.utils.cpp_extension.load_inline``, a
TorchScript-registered op, so no pybind11 and no Python headers) runs the whole time loop:

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
named by a hash of the source, the flags, torch's version and the CPU's instruction-set flags,
with ``strlowrank.cache.build_once`` (concurrent processes compile once, a killed compile is
redone); nothing is compiled at import time.
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

from strlowrank.cache import build_once, cache_root

_NAME = "strlowrank_gru"
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno"]

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

namespace {

// e^x for float, vectorizable: x = n ln2 + f, |f| <= ln2 / 2, e^f by a polynomial, 2^n by bits.
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;  // comparisons keep NaN
  x = x > 88.3f ? 88.3f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round to nearest via 1.5 * 2^23
  const float n = t - 12582912.0f;
  float f = x - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Rows [b0, b1) of one step: gi [., 3H] (row stride gi_rs), gh [., 3H], h [., H] (stride h_rs)
// -> h' (stride out_rs).
void gru_gates(const float* __restrict gi, int64_t gi_rs, const float* __restrict gh,
               const float* __restrict b_hn, const float* __restrict h, int64_t h_rs,
               float* __restrict out, int64_t out_rs, int64_t b0, int64_t b1, int64_t H) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* __restrict gr = gi + b * gi_rs;
    const float* __restrict hr = gh + b * 3 * H;
    const float* __restrict hp = h + b * h_rs;
    float* __restrict o = out + b * out_rs;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float r = 1.0f / (1.0f + exp_approx(-(gr[j] + hr[j])));
      const float z = 1.0f / (1.0f + exp_approx(-(gr[H + j] + hr[H + j])));
      const float a = gr[2 * H + j] + r * (hr[2 * H + j] + b_hn[j]);
      const float n = 1.0f - 2.0f / (exp_approx(2.0f * a) + 1.0f);
      o[j] = n + z * (hp[j] - n);
    }
  }
}

// y[0, n) = x[0, K) M for a row-major M [K, n] (row stride ldm): the products of one batch
// row, written as axpys over the rows of M (vectorized over n) into accumulators that stay in
// registers: chunks of C outputs, each with S partial sums over interleaved k (independent
// FMA chains when C is small); C = 64, 32, 16, then single outputs for the tail.
template <int64_t C, int64_t S>
int64_t vecmat_chunks(const float* __restrict x, const float* __restrict m, int64_t K,
                      int64_t n, int64_t ldm, float* __restrict y, int64_t j0) {
  for (; j0 + C <= n; j0 += C) {
    float acc[S][C] = {};
    int64_t k = 0;
    for (; k + S <= K; k += S) {
#pragma GCC unroll 8
      for (int64_t s = 0; s < S; ++s) {
        const float a = x[k + s];
        const float* __restrict row = m + (k + s) * ldm + j0;
#pragma GCC unroll 64
        for (int64_t j = 0; j < C; ++j) acc[s][j] += a * row[j];
      }
    }
    for (; k < K; ++k) {
      const float a = x[k];
      const float* __restrict row = m + k * ldm + j0;
#pragma GCC unroll 64
      for (int64_t j = 0; j < C; ++j) acc[0][j] += a * row[j];
    }
#pragma GCC unroll 8
    for (int64_t s = 1; s < S; ++s) {
#pragma GCC unroll 64
      for (int64_t j = 0; j < C; ++j) acc[0][j] += acc[s][j];
    }
    std::memcpy(y + j0, acc[0], sizeof(acc[0]));
  }
  return j0;
}

void vecmat(const float* __restrict x, const float* __restrict m, int64_t K, int64_t n,
            int64_t ldm, float* __restrict y) {
  int64_t j0 = vecmat_chunks<64, 1>(x, m, K, n, ldm, y, 0);
  j0 = vecmat_chunks<32, 2>(x, m, K, n, ldm, y, j0);
  j0 = vecmat_chunks<16, 4>(x, m, K, n, ldm, y, j0);
  vecmat_chunks<1, 4>(x, m, K, n, ldm, y, j0);
}

// The recurrence runs as per-row loops (vecmat) at batch 1, and at batch 2 while U's factors
// fit in 256 KB (L2; each row reads them again); otherwise as GEMMs, which read them once.
constexpr int64_t kRowsLoop = 2;
constexpr int64_t kRowsLoopBytes = 256 * 1024;

void check_matrix(const at::Tensor& m, const char* name) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 2,
              "strlowrank_gru: ", name, " must be a 2-d float32 CPU tensor");
}

// x [B, T, I], h0 [B, H] or None -> (out [B, T, H], h_T [B, H]). w_at [r_W, 3H] or [I, 3H],
// w_bt [I, r_W] (unused when W is dense), the same for U; block: steps per input-projection
// block (0: auto).
std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& h0, const at::Tensor& w_at,
    const at::Tensor& w_bt, const at::Tensor& u_at, const at::Tensor& u_bt,
    const at::Tensor& bias_ih, const at::Tensor& bias_hh, bool w_factored, bool u_factored,
    int64_t block) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 3,
              "strlowrank_gru: x must be a float32 CPU tensor [B, T, I]");
  check_matrix(w_at, "w_at");
  check_matrix(u_at, "u_at");
  if (w_factored) check_matrix(w_bt, "w_bt");
  if (u_factored) check_matrix(u_bt, "u_bt");
  TORCH_CHECK(!w_factored || w_bt.size(1) == w_at.size(0), "strlowrank_gru: W factors mismatch");
  TORCH_CHECK(!u_factored || u_bt.size(1) == u_at.size(0), "strlowrank_gru: U factors mismatch");
  const int64_t B = x_in.size(0), T = x_in.size(1), I = x_in.size(2);
  const int64_t H = bias_ih.size(0) / 3;
  TORCH_CHECK(bias_ih.numel() == 3 * H && bias_hh.numel() == 3 * H && u_at.size(1) == 3 * H &&
                  w_at.size(1) == 3 * H,
              "strlowrank_gru: inconsistent gate sizes");
  TORCH_CHECK((w_factored ? w_bt.size(0) : w_at.size(0)) == I,
              "strlowrank_gru: x has ", I, " features, W expects another number");
  TORCH_CHECK((u_factored ? u_bt.size(0) : u_at.size(0)) == H, "strlowrank_gru: U is not [3H, H]");
  const auto opts = x_in.options();
  at::Tensor h;
  if (h0.has_value()) {
    TORCH_CHECK(h0->dim() == 2 && h0->size(0) == B && h0->size(1) == H,
                "strlowrank_gru: h0 must be [B, H]");
    h = h0->to(at::kFloat).contiguous();
  } else {
    h = at::zeros({B, H}, opts);
  }
  auto out = at::empty({B, T, H}, opts);
  if (T == 0 || B == 0) return {out, h.clone()};

  // Time-major input (small), projected to rank r_W once when W is factored.
  at::Tensor xs = x_in.transpose(0, 1).contiguous().view({T * B, I});
  if (w_factored) xs = at::mm(xs, w_bt);
  at::Tensor bias_gi = bias_ih.to(at::kFloat).contiguous().clone();
  bias_gi.narrow(0, 0, 2 * H).add_(bias_hh.narrow(0, 0, 2 * H));
  const at::Tensor b_hn = bias_hh.narrow(0, 2 * H, H).to(at::kFloat).contiguous();

  if (block <= 0) block = std::max<int64_t>(1, (64 * 1024) / (B * 3 * H));  // ~256 KB of gi
  block = std::min(block, T);
  auto gi = at::empty({block * B, 3 * H}, opts);
  auto gh = at::empty({B, 3 * H}, opts);
  auto hu = at::empty({B, u_factored ? u_bt.size(1) : 0}, opts);
  const float* gi_p = gi.data_ptr<float>();
  float* gh_row = gh.data_ptr<float>();  // row 0 of gh: the small-batch path's buffer
  const float* gh_p = gh_row;
  float* hu_p = hu.data_ptr<float>();
  const int64_t rank_u = u_factored ? u_bt.size(1) : 0;
  const at::Tensor u_at_c = u_at.contiguous();
  const at::Tensor u_bt_c = u_factored ? u_bt.contiguous() : u_bt;
  const float* uat_p = u_at_c.data_ptr<float>();
  const float* ubt_p = u_factored ? u_bt_c.data_ptr<float>() : nullptr;
  const float* bhn_p = b_hn.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const float* h0_p = h.data_ptr<float>();
  const int64_t u_bytes = (u_at.numel() + (u_factored ? u_bt.numel() : 0)) * 4;
  const bool rows_loop = B == 1 || (B <= kRowsLoop && u_bytes <= kRowsLoopBytes);
  const int64_t grain = std::max<int64_t>(1, 16384 / H);

  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t steps = std::min(block, T - t0);
    auto gi_block = gi.narrow(0, 0, steps * B);
    at::addmm_out(gi_block, bias_gi, xs.narrow(0, t0 * B, steps * B), w_at);
    for (int64_t t = t0; t < t0 + steps; ++t) {
      // h_{t-1}: h0 [B, H] or out[:, t - 1] (row stride T H); pointers, no tensor per step
      const float* h_p = t == 0 ? h0_p : out_p + (t - 1) * H;
      const int64_t h_rs = t == 0 ? H : T * H;
      const float* gi_t = gi_p + (t - t0) * B * 3 * H;
      float* out_t = out_p + t * H;
      if (rows_loop) {  // per row: two vector-matrix products and the gates, no dispatch
        for (int64_t b = 0; b < B; ++b) {
          const float* hb = h_p + b * h_rs;
          if (u_factored) {
            vecmat(hb, ubt_p, H, rank_u, rank_u, hu_p);
            vecmat(hu_p, uat_p, rank_u, 3 * H, 3 * H, gh_row);
          } else {
            vecmat(hb, uat_p, H, 3 * H, 3 * H, gh_row);
          }
          gru_gates(gi_t + b * 3 * H, 0, gh_row, bhn_p, hb, 0, out_t + b * T * H, 0, 0, 1, H);
        }
        continue;
      }
      const at::Tensor hprev = t == 0 ? h : out.select(1, t - 1);
      if (u_factored) {
        at::mm_out(hu, hprev, u_bt);
        at::mm_out(gh, hu, u_at);
      } else {
        at::mm_out(gh, hprev, u_at);
      }
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        gru_gates(gi_t, 3 * H, gh_p, bhn_p, h_p, h_rs, out_t, T * H, b0, b1, H);
      });
    }
  }
  return {out, out.select(1, T - 1).clone()};
}

}  // namespace

TORCH_LIBRARY(strlowrank_gru, m) {
  m.def("forward(Tensor x, Tensor? h0, Tensor w_at, Tensor w_bt, Tensor u_at, Tensor u_bt, "
        "Tensor bias_ih, Tensor bias_hh, bool w_factored, bool u_factored, int block=0) "
        "-> (Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, &forward);
}
"""

_state: dict[str, object] = {"loaded": False, "error": None}


def cache_dir() -> Path:
    """The build folder: ``$STRLOWRANK_CACHE/torch_ext/<name>_<hash of source, flags, torch,
    CPU flags>`` (``-march=native`` binaries must not be shared across CPU kinds)."""
    key = "\n".join([_SOURCE, *_FLAGS, torch.__version__, platform.machine(), _cpu_flags()])
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
        warnings.simplefilter("ignore")
        _cpp_extension().load_inline(
            _NAME, cpp_sources=[_SOURCE], extra_cflags=_FLAGS, build_directory=str(folder),
            is_python_module=False, no_implicit_headers=True, verbose=False,
        )  # fmt: skip
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
        raise RuntimeError(f"strlowrank.gru_cpp is unavailable: {unavailable_reason()}")
    return torch.ops.strlowrank_gru.forward(x, h0, *weights, w_factored, u_factored, block)


class CompiledLowRankGRU(nn.Module):
    """``LowRankGRU``'s buffers run by the compiled op: x [B, T, I] (batch-first), h0 [B, H] or
    None -> (out [B, T, H], h_T [B, H]).

    The op takes float32 CPU inputs without autograd; inputs on another device (after
    ``.to(device)``) or needing gradients go through ``LowRankGRU``'s eager forward instead.
    """

    _names = ("w_at", "w_bt", "u_at", "u_bt", "bias_ih", "bias_hh")

    def __init__(self, gru: nn.Module) -> None:
        """``gru``: a ``LowRankGRU`` or its TorchScript form (``export_gru(..., "script")``)."""
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
            x.requires_grad or (h0 is not None and h0.requires_grad))  # fmt: skip
        if x.device.type != "cpu" or grad:
            from strlowrank.export import LowRankGRU

            return LowRankGRU.forward(self, x, h0)  # same buffer names and flags
        # buffers read from the dict (not six nn.Module.__getattr__ calls): a streaming call per
        # 10 ms frame spends most of its time outside the op
        buffers = self._buffers
        weights = [buffers[n] for n in self._names]
        return _state["op"](x, h0, *weights, self.w_factored, self.u_factored, 0)

    def step(self, x_t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame of a stream: x_t [B, I], h [B, H] -> (y_t [B, H], h' [B, H]), y_t = h'."""
        out, h_next = self.forward(x_t.unsqueeze(1), h)
        return out[:, 0], h_next

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, w_factored={self.w_factored}, "
                f"u_factored={self.u_factored}")  # fmt: skip
