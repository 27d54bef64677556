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
#include "sketch_rng.h"

namespace lrgptq {
namespace {

// H += X_bᵀ X_b, in H's dtype (float64 by default).
void gram_update(at::Tensor H, const at::Tensor& X) {
  check_state(H, "gram_update", "H", H.size(0));
  const at::Tensor Xb = as_rows(X, H.size(1), H.scalar_type(), "gram_update");
  H.addmm_(Xb.t(), Xb);
}

// R <- R-factor of [R; X_b] with diag(R) >= 0 (so that any split of the batches gives the same R).
void qr_update(at::Tensor R, const at::Tensor& X) {
  check_state(R, "qr_update", "R", R.size(0));
  TORCH_CHECK(R.size(0) == R.size(1), "lrgptq.qr_update: R must be square (d, d), got ", R.sizes());
  const at::Tensor Xb = as_rows(X, R.size(1), R.scalar_type(), "qr_update");
  if (Xb.size(0) == 0) return;
  at::Tensor Rn = std::get<1>(at::linalg_qr(at::cat({R, Xb}, 0), "r"));
  at::Tensor s = at::where(Rn.diagonal() < 0, -1.0, 1.0).to(Rn.scalar_type());
  R.copy_(Rn * s.unsqueeze(1));
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
