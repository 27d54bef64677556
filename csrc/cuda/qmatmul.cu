// Quantized matmul on CUDA: y = x · dequant(qweight)ᵀ for a GPTQ-layout layer (docs/design.md §9), with
//   w[n, i] = scales[g, n] · (q[i, n] − z[g, n]),  g = g_idx[i]   (in float32, as the CPU op),
// q and z read with the packing rule of csrc/bitpack.h (shared with the CPU), so 2/3/4/8 bits
// and act-order g_idx all take the same code.
//   - Few rows of x (M <= kFusedRows, decode): a fused kernel. Thread n owns output n: it walks
//     its column of qweight one pack block (32 inputs, `bits` words) at a time (consecutive
//     threads read consecutive words: coalesced), unpacks and dequantizes in registers and
//     accumulates x[m, i] · w for the M rows; x's and g_idx's chunk sit in shared memory. The inputs are split over gridDim.y chunks so that small layers still fill
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

// Value v (0..31) of a pack block's BITS words w (the bit stream of csrc/bitpack.h: 32 values
// fill BITS words; for 3 bits, values 10 and 21 straddle two words). v is a compile-time
// constant after unrolling, so this is a shift, maybe an OR, and a mask in registers.
template <int BITS>
__device__ __forceinline__ uint32_t extract(const uint32_t (&w)[BITS], int v) {
  const int off = v * BITS, k = off >> 5, sh = off & 31;
  uint32_t x = w[k] >> sh;
  if (sh + BITS > 32) x |= w[k + 1] << (32 - sh);
  return x & ((1u << BITS) - 1u);
}

// Inputs [blockIdx.y · span, ...) for outputs blockIdx.x · kThreads + threadIdx.x; the rows < rows
// of x (rows <= M, the compile-time row count; the rows past it are zeros in shared memory).
// Per pack block of 32 inputs, thread n loads its BITS words of qweight once (consecutive
// threads: consecutive words) and unpacks the 32 values in registers; the grid (s, z) is
// reloaded only when g_idx changes (once per group without act-order).
template <int M, int BITS>
__global__ void __launch_bounds__(kThreads) fused_kernel(Layer L, const float* X, float* Y, int rows, int64_t span) {
  __shared__ float xs[M][kChunk];
  __shared__ int32_t gs[kChunk];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.y) * span;
  const int64_t i_end = i_begin + span < L.d ? i_begin + span : L.d;
  const int64_t words = packed_words(L.d, BITS);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  int32_t g_last = -1;
  float s = 0.f, z = 0.f;
  for (int64_t c0 = i_begin; c0 < i_end; c0 += kChunk) {  // c0: a multiple of kChunk, so of 32
    const int cn = static_cast<int>(i_end - c0 < kChunk ? i_end - c0 : kChunk);
    __syncthreads();  // the previous chunk is no longer read
    for (int idx = threadIdx.x; idx < M * cn; idx += kThreads)
      xs[idx / cn][idx % cn] = idx / cn < rows ? X[(idx / cn) * L.d + c0 + idx % cn] : 0.f;
    for (int idx = threadIdx.x; idx < cn; idx += kThreads) gs[idx] = L.g_idx[c0 + idx];
    __syncthreads();
    if (n >= L.d_out) continue;  // no barrier is skipped: the next one is at the loop's top
    for (int b = 0; b < cn; b += 32) {
      const int64_t word0 = (c0 + b) / 32 * BITS;
      uint32_t w[BITS];
#pragma unroll
      for (int k = 0; k < BITS; ++k)
        w[k] = word0 + k < words ? static_cast<uint32_t>(L.qw[(word0 + k) * L.d_out + n]) : 0u;
#pragma unroll
      for (int v = 0; v < 32; ++v) {
        if (b + v < cn) {
          const int32_t g = gs[b + v];
          if (g != g_last) {
            g_last = g;
            s = L.S[g * L.d_out + n];
            z = static_cast<float>(stream_get(L.qz + g * L.zw, 1, n, BITS)) + L.zero_offset;
          }
          const float wv = s * (static_cast<float>(extract<BITS>(w, v)) - z);
#pragma unroll
          for (int m = 0; m < M; ++m) acc[m] += xs[m][b + v] * wv;
        }
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
  const int rows = static_cast<int>(X.size(0));
  const float* x = X.data_ptr<float>();
  float* y = Y.data_ptr<float>();
  switch (L.bits) {
    case 2: fused_kernel<M, 2><<<grid, kThreads, 0, stream>>>(L, x, y, rows, span); break;
    case 3: fused_kernel<M, 3><<<grid, kThreads, 0, stream>>>(L, x, y, rows, span); break;
    case 4: fused_kernel<M, 4><<<grid, kThreads, 0, stream>>>(L, x, y, rows, span); break;
    default: fused_kernel<M, 8><<<grid, kThreads, 0, stream>>>(L, x, y, rows, span); break;
  }
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
