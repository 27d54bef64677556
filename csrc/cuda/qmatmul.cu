// Quantized matmul on CUDA: y = x · dequant(qweight)ᵀ for a GPTQ-layout layer (DESIGN §9), with
//   w[n, i] = scales[g, n] · (q[i, n] − z[g, n]),  g = g_idx[i]   (in float32, as the CPU op),
// q and z read with the packing rule of csrc/bitpack.h (shared with the CPU), so 2/3/4/8 bits
// and act-order g_idx all take the same code.
//   - Few rows of x (M <= kFusedRows, decode): a fused kernel. Thread n owns output n: it walks
//     its column of qweight (consecutive threads read consecutive words: coalesced), dequantizes
//     each value in registers and accumulates x[m, i] · w for the M rows; x's chunk sits in
//     shared memory. The inputs are split over gridDim.y chunks so that small layers still fill
//     the GPU; the chunks' partial sums meet by atomicAdd (float: equal to rounding, not bit for bit).
//   - More rows: each weight is dequantized once into a float16 (d, d_out) buffer (memory-bound,
//     the packed weight read once) and the product is one cuBLAS GEMM (at::mm) with float32
//     accumulation. Not fused: at M >= 16 the GEMM dominates.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../bitpack.h"
#include "../cuda_ops.h"

namespace lrgptq {
namespace {

constexpr int kFusedRows = 8;   // rows of x handled by the fused kernel
constexpr int kThreads = 128;   // outputs per thread block
constexpr int kChunk = 512;     // inputs per shared-memory chunk of x (8 × 512 floats = 16 KiB)

struct Layer {
  const int32_t* qw;  // (words(d), d_out)
  const int32_t* qz;  // (G, words(d_out))
  const float* S;     // (G, d_out)
  const int32_t* g_idx;
  int64_t d, d_out, zw;
  int bits;
  float zero_offset;
};

__device__ __forceinline__ float weight(const Layer& L, int64_t i, int64_t n) {
  const int64_t g = L.g_idx[i];
  const float q = static_cast<float>(stream_get(L.qw + n, L.d_out, i, L.bits));
  const float z = static_cast<float>(stream_get(L.qz + g * L.zw, 1, n, L.bits)) + L.zero_offset;
  return L.S[g * L.d_out + n] * (q - z);
}

// Inputs [blockIdx.y · span, ...) for outputs blockIdx.x · kThreads + threadIdx.x; the rows < rows
// of x (rows <= M, the compile-time row count; the rows past it are zeros in shared memory).
template <int M>
__global__ void __launch_bounds__(kThreads) fused_kernel(Layer L, const float* X, float* Y, int rows, int64_t span) {
  __shared__ float xs[M][kChunk];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.y) * span;
  const int64_t i_end = i_begin + span < L.d ? i_begin + span : L.d;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t c0 = i_begin; c0 < i_end; c0 += kChunk) {
    const int64_t cn = i_end - c0 < kChunk ? i_end - c0 : kChunk;
    __syncthreads();  // the previous chunk is no longer read
    for (int64_t idx = threadIdx.x; idx < M * cn; idx += kThreads)
      xs[idx / cn][idx % cn] = idx / cn < rows ? X[(idx / cn) * L.d + c0 + idx % cn] : 0.f;
    __syncthreads();
    if (n < L.d_out) {
      for (int64_t c = 0; c < cn; ++c) {
        const float w = weight(L, c0 + c, n);
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] += xs[m][c] * w;
      }
    }
  }
  if (n < L.d_out) {
#pragma unroll
    for (int m = 0; m < M; ++m)
      if (m < rows) atomicAdd(Y + m * L.d_out + n, acc[m]);
  }
}

// Wt[i, n] = w[n, i] in float16: consecutive threads take consecutive n (coalesced both ways).
__global__ void dequant_kernel(Layer L, at::Half* Wt) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= L.d * L.d_out) return;
  const int64_t i = idx / L.d_out, n = idx % L.d_out;
  Wt[idx] = static_cast<at::Half>(weight(L, i, n));
}

template <int M>
void launch_fused(const Layer& L, const at::Tensor& X, at::Tensor& Y, cudaStream_t stream) {
  const int64_t nx = (L.d_out + kThreads - 1) / kThreads;
  // Enough input chunks for ~4 thread blocks per SM on a 132-SM GPU, each at least kChunk long.
  const int64_t want = std::max<int64_t>(1, 528 / nx);
  const int64_t parts = std::min<int64_t>(want, (L.d + kChunk - 1) / kChunk);
  const int64_t span = ((L.d + parts - 1) / parts + kChunk - 1) / kChunk * kChunk;
  const dim3 grid(static_cast<unsigned>(nx), static_cast<unsigned>((L.d + span - 1) / span));
  fused_kernel<M><<<grid, kThreads, 0, stream>>>(L, X.data_ptr<float>(), Y.data_ptr<float>(),
                                                 static_cast<int>(X.size(0)), span);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor qmatmul_cuda(const at::Tensor& X, const at::Tensor& qweight, const at::Tensor& qzeros,
                        const at::Tensor& S, const at::Tensor& g_idx, int64_t bits, int64_t zero_offset) {
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t M = X.size(0), d = X.size(1), d_out = S.size(1);
  at::Tensor Y = at::zeros({M, d_out}, X.options());
  if (M == 0 || d == 0 || d_out == 0) return Y;
  const Layer L{qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), S.data_ptr<float>(),
                g_idx.data_ptr<int32_t>(), d, d_out, qzeros.size(1), static_cast<int>(bits),
                static_cast<float>(zero_offset)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (M == 1) {
    launch_fused<1>(L, X, Y, stream);
  } else if (M == 2) {
    launch_fused<2>(L, X, Y, stream);
  } else if (M <= 4) {
    launch_fused<4>(L, X, Y, stream);
  } else if (M <= kFusedRows) {
    launch_fused<kFusedRows>(L, X, Y, stream);
  } else {
    at::Tensor Wt = at::empty({d, d_out}, X.options().dtype(at::kHalf));
    const int64_t n = d * d_out;
    dequant_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(L, Wt.data_ptr<at::Half>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Y = at::mm(X.to(at::kHalf), Wt).to(at::kFloat);
  }
  return Y;
}

}  // namespace lrgptq
