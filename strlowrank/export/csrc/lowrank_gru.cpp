// The low-rank GRU's time loop as one TorchScript-registered CPU op,
// torch.ops.strlowrank_gru.forward. Built at first use by strlowrank/gru_cpp.py, whose
// docstring gives the math and the compiler flags.

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
