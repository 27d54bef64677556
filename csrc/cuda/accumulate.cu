// The sketch accumulator's draws on CUDA (docs/design.md §2), from the counter-based RNG of
// csrc/sketch_rng.h, shared with the CPU op so that both devices draw the same S:
//   sparse:   Y += S_b X_b with zeta entries ±1/√zeta per token, scattered by atomicAdd (the order
//             of the sums differs from the CPU's token order: equal to rounding, not bit for bit);
//   gaussian: Y += S_b X_b with S[r, t] = N(0, 1)/√m from sketch_normal, drawn tile by tile inside
//             the product, never stored. CUDA's log/cos are not correctly rounded, so S matches
//             the CPU's to a few ulps.
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
constexpr int kThreads = 256;       // sparse: threads per token

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

// Y (m × d) += S X for X (N × d), S[r, t] = a · sketch_normal(seed, offset + t, r), without S in
// memory: a thread block owns a kTile × kTile tile of Y and, per kTile tokens, draws its
// kTile × kTile piece of S into shared memory (redrawn by each column tile of Y: about
// d/kTile draws per entry of S, against 2d flops of product per entry), loads the matching piece of
// X and accumulates. blockDim (kTile, kTile / kRowsPerThread): each thread owns kRowsPerThread rows.
constexpr int kTile = 32;
constexpr int kRowsPerThread = 4;
__global__ void __launch_bounds__(kTile * kTile / kRowsPerThread)
    sketch_gaussian_kernel(double* Y, const double* X, int64_t m, int64_t N, int64_t d, uint64_t seed,
                           int64_t offset, double a) {
  __shared__ double Ss[kTile][kTile + 1];
  __shared__ double Xs[kTile][kTile + 1];
  constexpr int kStep = kTile / kRowsPerThread;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  double acc[kRowsPerThread] = {};
  for (int64_t t0 = 0; t0 < N; t0 += kTile) {
    for (int i = ty; i < kTile; i += kStep) {
      const int64_t r = r0 + i, t = t0 + tx;  // S[r, t]: row i of the tile, token tx
      Ss[i][tx] = r < m && t < N ? a * sketch_normal(seed, static_cast<uint64_t>(offset + t), static_cast<uint64_t>(r))
                                 : 0.0;
      const int64_t tt = t0 + i, c = c0 + tx;  // X[tt, c]: token i of the tile, column tx
      Xs[i][tx] = tt < N && c < d ? X[tt * d + c] : 0.0;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTile; ++k) {
      const double x = Xs[k][tx];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) acc[q] += Ss[ty + kStep * q][k] * x;
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t r = r0 + ty + kStep * q, c = c0 + tx;
    if (r < m && c < d) Y[r * d + c] += acc[q];
  }
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

void sketch_gaussian_cuda(at::Tensor& Y, const at::Tensor& X, uint64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(Y.device());
  TORCH_CHECK(Y.is_contiguous() && X.is_contiguous() && X.scalar_type() == at::kDouble,
              "lrgptq.sketch_update (CUDA): internal error, Y and X must be contiguous float64");
  const int64_t N = X.size(0), m = Y.size(0), d = Y.size(1);
  if (N == 0 || m == 0 || d == 0) return;
  TORCH_CHECK((m + kTile - 1) / kTile < 65536, "lrgptq.sketch_update: on CUDA, m must be < ", 65536 * kTile,
              ", got ", m);
  const dim3 grid(static_cast<unsigned>((d + kTile - 1) / kTile), static_cast<unsigned>((m + kTile - 1) / kTile));
  const dim3 block(kTile, kTile / kRowsPerThread);
  sketch_gaussian_kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      Y.data_ptr<double>(), X.data_ptr<double>(), m, N, d, seed, offset, 1.0 / std::sqrt(static_cast<double>(m)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lrgptq
