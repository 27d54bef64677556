// Accumulators (docs/design.md §2): what we keep of the calibration inputs X while they stream.
//   gram:   H += X_bᵀ X_b
//   qr:     R <- R-factor of [R; X_b]            (RᵀR = H, never forms H)
//   sketch: Y += S_b X_b                          (S_b from (seed, global token index))
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "cuda_ops.h"
#include "gram.h"
#include "sketch_rng.h"

namespace lrgptq {
namespace {

// H += X_bᵀ X_b, in H's dtype (float64 by default), on H's upper triangle, mirrored (gram.h).
void gram_update(at::Tensor H, const at::Tensor& X) {
  check_state(H, "gram_update", "H", H.size(0));
  gram_upper(H, as_rows(X, H.size(1), H.scalar_type(), "gram_update"), /*triangular=*/false, /*beta=*/1.0);
}

// ---------------------------------------------------------------- qr: R <- R-factor of [R; X_b]
// A structured blocked Householder QR (LAPACK's tpqrt, with dlarfgp's non-negative diagonal): R is
// upper triangular, so reflector k only mixes R's row k with X_b's rows, v_k = e_k + y_k (y_k in
// X_b's rows), and a block of reflectors is I - V T Vᵀ with V = [I; Y]. The updates of the columns
// right of a block are two GEMMs with X_b, so the cost is 2·N·d² flops at GEMM speed, as H += XᵀX.
// X_b is held transposed (Xt = X_bᵀ, d x N), so that y_k = Xt[k] is a contiguous row.
constexpr int64_t kQrBlock = 128;  // columns per block reflector applied to the trailing columns
constexpr int64_t kQrBase = 16;    // columns factored one at a time (inside a block, by recursion)

// Columns [j0, j0 + n), one reflector each: (R_kk, Xt[k]) -> (beta >= 0, 0), the reflector applied
// to the block's later columns; taus[i] = tau of column j0 + i.
template <typename scalar_t>
void qr_columns(scalar_t* r, int64_t d, scalar_t* xt, int64_t m, int64_t j0, int64_t n, double* taus) {
  for (int64_t k = j0; k < j0 + n; ++k) {
    scalar_t* y = xt + k * m;
    double s2 = 0.0;  // in double: a float32 state's squares must not overflow
#pragma omp simd reduction(+ : s2)
    for (int64_t t = 0; t < m; ++t) s2 += static_cast<double>(y[t]) * static_cast<double>(y[t]);
    const double alpha = static_cast<double>(r[k * d + k]);
    double tau = 0.0;
    if (s2 == 0.0) {
      if (alpha < 0.0) {  // H = I - 2 e_k e_kᵀ: flips row k
        tau = 2.0;
        r[k * d + k] = static_cast<scalar_t>(-alpha);
      }
    } else {
      const double beta = std::sqrt(alpha * alpha + s2);
      const double amb = alpha > 0.0 ? -s2 / (alpha + beta) : alpha - beta;  // alpha - beta, no cancellation
      tau = alpha > 0.0 ? s2 / ((alpha + beta) * beta) : (beta - alpha) / beta;  // (beta - alpha) / beta
      const scalar_t inv = static_cast<scalar_t>(1.0 / amb);
#pragma omp simd
      for (int64_t t = 0; t < m; ++t) y[t] *= inv;
      r[k * d + k] = static_cast<scalar_t>(beta);
    }
    taus[k - j0] = tau;
    if (tau == 0.0) continue;
    const scalar_t ts = static_cast<scalar_t>(tau);
    for (int64_t c = k + 1; c < j0 + n; ++c) {
      scalar_t* x = xt + c * m;
      scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t t = 0; t < m; ++t) dot += y[t] * x[t];
      const scalar_t w = ts * (r[k * d + c] + dot);
      r[k * d + c] -= w;
#pragma omp simd
      for (int64_t t = 0; t < m; ++t) x[t] -= w * y[t];
    }
  }
}

// Applies Qᵀ = I - V Tᵀ Vᵀ of the reflectors of columns [j0, j0 + n) to columns [c0, c1).
void qr_apply(at::Tensor& R, at::Tensor& Xt, int64_t j0, int64_t n, const at::Tensor& T, int64_t c0, int64_t c1) {
  const at::Tensor Y = Xt.narrow(0, j0, n);
  at::Tensor CR = R.narrow(0, j0, n).narrow(1, c0, c1 - c0);
  at::Tensor CX = Xt.narrow(0, c0, c1 - c0);
  const at::Tensor W = at::mm(T.t(), at::mm(Y, CX.t()).add_(CR));
  CR.sub_(W);
  CX.addmm_(W.t(), Y, 1, -1);
}

// Factors columns [j0, j0 + n) (recursively, Elmroth-Gustavson) and returns their T (n x n, upper).
at::Tensor qr_block(at::Tensor& R, at::Tensor& Xt, int64_t j0, int64_t n) {
  if (n <= kQrBase) {
    std::vector<double> taus(n);
    const int64_t d = R.size(1), m = Xt.size(1);
    AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "qr_update", [&] {
      qr_columns<scalar_t>(R.data_ptr<scalar_t>(), d, Xt.data_ptr<scalar_t>(), m, j0, n, taus.data());
    });
    // T by LAPACK's larft: T[:i, i] = -tau_i T[:i, :i] (Yᵀ y_i), T[i, i] = tau_i.
    const at::Tensor Y = Xt.narrow(0, j0, n);
    const at::Tensor G = at::mm(Y, Y.t()).to(at::kDouble).contiguous();
    std::vector<double> t(n * n, 0.0);
    const double* g = G.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) {
      t[i * n + i] = taus[i];
      for (int64_t a = 0; a < i; ++a) {
        double s = 0.0;
        for (int64_t b = a; b < i; ++b) s += t[a * n + b] * g[b * n + i];
        t[a * n + i] = -taus[i] * s;
      }
    }
    return at::from_blob(t.data(), {n, n}, at::kDouble).to(R.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  const int64_t n1 = n / 2, n2 = n - n1;
  const at::Tensor T1 = qr_block(R, Xt, j0, n1);
  qr_apply(R, Xt, j0, n1, T1, j0 + n1, j0 + n);
  const at::Tensor T2 = qr_block(R, Xt, j0 + n1, n2);
  at::Tensor T = at::zeros({n, n}, R.options());
  T.narrow(0, 0, n1).narrow(1, 0, n1).copy_(T1);
  T.narrow(0, n1, n2).narrow(1, n1, n2).copy_(T2);
  // Q1 Q2 = I - V T Vᵀ with T12 = -T1 (V1ᵀ V2) T2, and V1ᵀ V2 = Y1ᵀ Y2 (their e_k parts do not meet).
  T.narrow(0, 0, n1).narrow(1, n1, n2)
      .copy_(at::mm(at::mm(T1, at::mm(Xt.narrow(0, j0, n1), Xt.narrow(0, j0 + n1, n2).t())), T2).neg_());
  return T;
}

// R <- R-factor of [R; X_b] with diag(R) >= 0 (so that any split of the batches gives the same R).
void qr_update(at::Tensor R, const at::Tensor& X) {
  check_state(R, "qr_update", "R", R.size(0));
  TORCH_CHECK(R.size(0) == R.size(1), "lrgptq.qr_update: R must be square (d, d), got ", R.sizes());
  const at::Tensor Xb = as_rows(X, R.size(1), R.scalar_type(), "qr_update");
  if (Xb.size(0) == 0) return;
  if (R.is_cuda() || at::any(at::tril(R, -1) != 0).item<bool>()) {
    // cuSOLVER's geqrf, or an R that is not triangular (the structure above does not hold).
    at::Tensor Rn = std::get<1>(at::linalg_qr(at::cat({R, Xb}, 0), "r"));
    at::Tensor s = at::where(Rn.diagonal() < 0, -1.0, 1.0).to(Rn.scalar_type());
    R.copy_(Rn * s.unsqueeze(1));
    return;
  }
  at::Tensor Xt = Xb.t().clone(at::MemoryFormat::Contiguous);  // a copy: X_b is overwritten by Y
  const int64_t d = R.size(1);
  for (int64_t j0 = 0; j0 < d; j0 += kQrBlock) {
    const int64_t n = std::min(kQrBlock, d - j0);
    const at::Tensor T = qr_block(R, Xt, j0, n);
    if (j0 + n < d) qr_apply(R, Xt, j0, n, T, j0 + n, d);
  }
}

// Y += S_b X_b. Column t of S_b belongs to the token with global index offset + t.
//   sparse:   zeta entries ±1/sqrt(zeta) in rows drawn by the counter hash
//   gaussian: m entries N(0, 1/m)
void sketch_update(at::Tensor Y, const at::Tensor& X, int64_t seed, int64_t offset,
                   c10::string_view kind, int64_t zeta) {
  check_state(Y, "sketch_update", "Y", Y.size(1));
  TORCH_CHECK(Y.scalar_type() == at::kDouble, "lrgptq.sketch_update: Y must be float64");
  TORCH_CHECK(offset >= 0, "lrgptq.sketch_update: offset must be >= 0, got ", offset);
  const int64_t m = Y.size(0), d = Y.size(1);
  const at::Tensor Xb = as_rows(X, d, at::kDouble, "sketch_update").contiguous();
  const int64_t N = Xb.size(0);
  if (N == 0) return;
  const uint64_t s = static_cast<uint64_t>(seed);
  TORCH_CHECK(kind == "sparse" || kind == "gaussian",
              "lrgptq.sketch_update: kind must be 'sparse' or 'gaussian', got '", kind, "'");
  TORCH_CHECK(kind != "sparse" || (zeta >= 1 && zeta <= m), "lrgptq.sketch_update: zeta must be in [1, m=", m,
              "], got ", zeta);
  if (Y.is_cuda()) {
#ifdef LRGPTQ_WITH_CUDA
    TORCH_CHECK(Xb.device() == Y.device(), "lrgptq.sketch_update: X must be on Y's device ", Y.device(),
                ", got ", Xb.device());
    if (kind == "sparse") {
      sketch_sparse_cuda(Y, Xb, s, offset, zeta);
    } else {
      sketch_gaussian_cuda(Y, Xb, s, offset);
    }
    return;
#else
    TORCH_CHECK(false, "lrgptq.sketch_update: this build has no CUDA kernels; rebuild with a CUDA torch");
#endif
  }
  if (kind == "sparse") {
    const double a = 1.0 / std::sqrt(static_cast<double>(zeta));
    double* y = Y.data_ptr<double>();
    const double* x = Xb.data_ptr<double>();
    // The zeta distinct rows and signs of each token's column of S (redrawn on a collision).
    std::vector<int64_t> rows(N * zeta);
    std::vector<double> vals(N * zeta);
    at::parallel_for(0, N, 256, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t* r = rows.data() + t * zeta;
        for (int64_t l = 0, draw = 0; l < zeta; ++draw) {
          const uint64_t h = sketch_hash(s, static_cast<uint64_t>(offset + t), static_cast<uint64_t>(draw));
          const int64_t row = static_cast<int64_t>(h % static_cast<uint64_t>(m));
          if (std::find(r, r + l, row) != r + l) continue;
          r[l] = row;
          vals[t * zeta + l] = (h >> 63) ? -a : a;
          ++l;
        }
      }
    });
    // Threads own column ranges of Y, so every Y entry is summed in token order.
    at::parallel_for(0, d, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t t = 0; t < N; ++t) {
        const double* xt = x + t * d;
        for (int64_t l = 0; l < zeta; ++l) {
          double* yr = y + rows[t * zeta + l] * d;
          const double v = vals[t * zeta + l];
          for (int64_t c = c0; c < c1; ++c) yr[c] += v * xt[c];
        }
      }
    });
  } else {
    at::Tensor S = at::empty({m, N}, Xb.options());
    auto Sa = S.accessor<double, 2>();
    const double a = 1.0 / std::sqrt(static_cast<double>(m));
    at::parallel_for(0, N, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint64_t n = static_cast<uint64_t>(offset + t);
        for (int64_t r = 0; r < m; ++r) Sa[r][t] = a * sketch_normal(s, n, static_cast<uint64_t>(r));
      }
    });
    Y.addmm_(S, Xb);
  }
}

// In-place updates with no outputs: on Meta the shapes are all there is, so nothing to do.
void update_meta(at::Tensor, const at::Tensor&) {}
void sketch_update_meta(at::Tensor, const at::Tensor&, int64_t, int64_t, c10::string_view, int64_t) {}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, Meta, m) {
  m.impl("gram_update", &update_meta);
  m.impl("qr_update", &update_meta);
  m.impl("sketch_update", &sketch_update_meta);
}

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) {
  m.impl("gram_update", &gram_update);
  m.impl("qr_update", &qr_update);
  m.impl("sketch_update", &sketch_update);
}

#ifdef LRGPTQ_WITH_CUDA
// gram and qr are ATen ops (cuBLAS GEMM in H's dtype, float64 by default; cuSOLVER geqrf), so the
// CPU functions run unchanged on CUDA tensors; the sketches run in csrc/cuda/accumulate.cu.
TORCH_LIBRARY_IMPL(lrgptq, CUDA, m) {
  m.impl("gram_update", &gram_update);
  m.impl("qr_update", &qr_update);
  m.impl("sketch_update", &sketch_update);
}
#endif

}  // namespace lrgptq
