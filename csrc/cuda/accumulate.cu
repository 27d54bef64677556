// The sketch accumulator's draws on CUDA (DESIGN §2), from the counter-based RNG of
// csrc/sketch_rng.h, shared with the CPU op so that both devices draw the same S:
//   sparse:   Y += S_b X_b with zeta entries ±1/√zeta per token, scattered by atomicAdd (the order
//             of the sums differs from the CPU's token order: equal to rounding, not bit for bit);
//   gaussian: S (m × N) with S[r, t] = N(0, 1)/√m from sketch_normal, then one GEMM (the caller).
//             CUDA's log/cos are not correctly rounded, so S matches the CPU's to a few ulps.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "../cuda_ops.h"
#include "../sketch_rng.h"

namespace lrgptq {
namespace {

constexpr int kMaxZeta = 64;       // draws per token kept in registers; larger zeta: CPU op
constexpr int kThreads = 256;

// One thread block per token t (blockIdx.x); its threads draw the same zeta rows (cheap hashes)
// and split the d columns: Y[row_l, c] += v_l · X[t, c].
__global__ void sketch_sparse_kernel(double* Y, const double* X, int64_t m, int64_t d, uint64_t seed,
                                     int64_t offset, int zeta, double a) {
  const int64_t t = blockIdx.x;
  int64_t rows[kMaxZeta];
  double vals[kMaxZeta];
  for (int l = 0, draw = 0; l < zeta; ++draw) {  // distinct rows, redrawn on a collision (as the CPU op)
    const uint64_t h = sketch_hash(seed, static_cast<uint64_t>(offset + t), static_cast<uint64_t>(draw));
    const int64_t row = static_cast<int64_t>(h % static_cast<uint64_t>(m));
    bool seen = false;
    for (int i = 0; i < l; ++i) seen |= rows[i] == row;
    if (seen) continue;
    rows[l] = row;
    vals[l] = (h >> 63) ? -a : a;
    ++l;
  }
  const double* xt = X + t * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const double x = xt[c];
    for (int l = 0; l < zeta; ++l) atomicAdd(Y + rows[l] * d + c, vals[l] * x);
  }
}

__global__ void sketch_gaussian_kernel(double* S, int64_t m, int64_t N, uint64_t seed, int64_t offset, double a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= m * N) return;
  const int64_t r = idx / N, t = idx % N;
  S[idx] = a * sketch_normal(seed, static_cast<uint64_t>(offset + t), static_cast<uint64_t>(r));
}

}  // namespace

void sketch_sparse_cuda(at::Tensor& Y, const at::Tensor& X, uint64_t seed, int64_t offset, int64_t zeta) {
  const c10::cuda::CUDAGuard guard(Y.device());
  TORCH_CHECK(zeta <= kMaxZeta, "lrgptq.sketch_update: on CUDA, zeta must be <= ", kMaxZeta, ", got ", zeta,
              "; use a smaller zeta (about 8 is usual) or sketch on the CPU");
  TORCH_CHECK(Y.is_contiguous() && X.is_contiguous() && X.scalar_type() == at::kDouble,
              "lrgptq.sketch_update (CUDA): internal error, Y and X must be contiguous float64");
  const int64_t N = X.size(0), m = Y.size(0), d = Y.size(1);
  if (N == 0 || d == 0) return;
  TORCH_CHECK(N < (int64_t{1} << 31), "lrgptq.sketch_update: on CUDA, a batch must have < 2^31 tokens, got ", N,
              "; split the batch");
  const double a = 1.0 / std::sqrt(static_cast<double>(zeta));
  sketch_sparse_kernel<<<static_cast<unsigned>(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      Y.data_ptr<double>(), X.data_ptr<double>(), m, d, seed, offset, static_cast<int>(zeta), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sketch_gaussian_matrix_cuda(int64_t m, int64_t N, uint64_t seed, int64_t offset,
                                       const at::TensorOptions& opts) {
  const c10::cuda::CUDAGuard guard(opts.device());
  at::Tensor S = at::empty({m, N}, opts.dtype(at::kDouble));
  const int64_t n = m * N;
  if (n == 0) return S;
  const double a = 1.0 / std::sqrt(static_cast<double>(m));
  sketch_gaussian_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(S.data_ptr<double>(), m, N, seed, offset, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return S;
}

}  // namespace lrgptq
