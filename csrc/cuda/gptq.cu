// The GPTQ engine on CUDA (docs/design.md §4): the block loop of csrc/gptq.cpp with
//   - one kernel launch per block of B columns (never per column): each CUDA thread block owns
//     kRows rows and holds their block segment T[r, i1:i2] in shared memory (kRows × B values,
//     stored column-major with a padded stride); kLanes threads per row run its sequential loop:
//     q_j = quant(T_j);  e_j = (base_j − Q_j)/U_jj;  T_l −= e_j · U_jl (l in (j, i2), split over
//     the lanes);  loss += (T_j − Q_j)²/U_jj².  U_jl is read by the 8 rows of a warp at one
//     address (a broadcast).
//   - the lazy update after the block, T[:, i2:] −= E_block · U[i1:i2, i2:], as one cuBLAS GEMM
//     through at::addmm_. E is kept column-major (B, d_out) so the kernel's writes coalesce.
// The quantizer is csrc/quantizer.h, shared with the CPU engine. Compiled with --fmad=false
// (CMake and scripts/check_cuda.sh) so that, in float64 and within one block, the arithmetic is
// the CPU engine's operation for operation; across blocks the GEMM sums in cuBLAS's order.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../cuda_ops.h"
#include "../gptq_blocks.h"
#include "../quantizer.h"

namespace lrgptq {
namespace {

constexpr int kRows = 32;                 // rows per CUDA thread block
constexpr int kLanes = 4;                 // threads per row (adjacent lanes of one warp)
constexpr int kThreads = kRows * kLanes;  // 128: a warp holds 8 rows × 4 lanes
constexpr int kStride = 40;               // tile column stride ≡ 8 (mod 32): the 8 rows × 4
                                          // consecutive columns a warp updates hit 32 banks
constexpr size_t kSharedBytes = 48 * 1024;      // the default dynamic shared memory limit

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
struct Args {
  int64_t d_out, d, k, gsz;
  bool from_original, sym, mse, static_groups;
  T maxq;
  const T* Tw;  // (d_out, d) targets; read only here (the block segment is copied to the tile)
  T* Tw_mut;    // the same, written in place when the tile does not fit in shared memory
  const T* W0;
  const T* U;
  const int64_t* perm;
  T* scales;
  T* zeros;
  uint8_t* codes;
  T* Q;
  T* E;  // (B, d_out) column-major scaled errors of the block
  T* row_loss;
  int64_t* clipped;
};

// Static groups: the grid of (row r, group g) from the original W, before any update.
template <typename T>
__global__ void static_grids_kernel(Args<T> a, const T* W, int64_t G) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.d_out * G) return;
  const int64_t g = idx / a.d_out, r = idx % a.d_out;  // consecutive threads: consecutive rows
  const T* w = W + r * a.d + g * a.gsz;
  const Grid<T> grid = find_grid_fn<T>([w](int64_t i) { return w[i]; }, imin(a.gsz, a.d - g * a.gsz),
                                       a.maxq, a.sym, a.mse);
  a.scales[g * a.d_out + r] = grid.scale;
  a.zeros[g * a.d_out + r] = grid.zero;
}

// The columns [i1, i2) for kRows rows, kLanes threads per row (the kLanes threads of a row are
// adjacent lanes of one warp). in_shared: the tile lives in shared memory (else the loop works on
// Tw in global memory directly, for blocks too wide for shared memory). Per column j, lane 0 of
// the row finds the group's grid (at a group start) and quantizes; its scaled error goes to the
// row's other lanes by a shuffle; then lane s updates the columns j + 1 + s, j + 1 + s + kLanes, ...
// Each target still receives its updates in increasing j (a warp barrier between columns), with
// the CPU's operations, so the result is the CPU engine's bit for bit.
template <typename T>
__global__ void __launch_bounds__(kThreads) block_kernel(Args<T> a, int64_t i1, int64_t i2, bool in_shared) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* tile = reinterpret_cast<T*>(smem);  // tile[c * kStride + row] = T[row0 + row, i1 + c]
  const int row = threadIdx.x / kLanes, sub = threadIdx.x % kLanes;
  const int leader = (threadIdx.x % 32) & ~(kLanes - 1);  // warp lane of this row's lane 0
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t r = row0 + row;
  const int64_t bw = i2 - i1, d = a.d;
  const int64_t rows_here = imin(kRows, a.d_out - row0);
  const bool live = row < rows_here;  // rows past d_out run along (for the shuffles), touching nothing
  if (in_shared) {  // coalesced along each row of Tw
    for (int64_t idx = threadIdx.x; idx < kRows * bw; idx += kThreads) {
      const int64_t rr = idx / bw, c = idx % bw;
      tile[c * kStride + rr] = rr < rows_here ? a.Tw[(row0 + rr) * d + i1 + c] : T(0);
    }
    __syncthreads();
  }
  T* t = in_shared ? tile + row : a.Tw_mut + (live ? r : 0) * d + i1;  // column i1 + c at t[c * cs]
  const int64_t cs = in_shared ? kStride : 1;
  const T* trow = a.Tw + (live ? r : 0) * d;  // columns past the block (read by a group starting at i1)
  T loss = 0;
  int64_t n_clipped = 0;
  for (int64_t j = i1; j < i2; ++j) {
    __syncwarp();  // the updates of the previous column are visible to the whole row
    const int64_t c = j - i1;
    T err = 0;
    if (sub == 0 && live) {
      if (!a.static_groups && j % a.gsz == 0) {  // group params from the fully updated targets
        const Grid<T> g = find_grid_fn<T>(
            [&](int64_t i) { return j + i < i2 ? t[(c + i) * cs] : trow[j + i]; }, imin(a.gsz, d - j), a.maxq,
            a.sym, a.mse);
        a.scales[(j / a.gsz) * a.d_out + r] = g.scale;
        a.zeros[(j / a.gsz) * a.d_out + r] = g.zero;
      }
      const int64_t grp = (a.static_groups ? a.perm[j] : j) / a.gsz;
      const Grid<T> g{a.scales[grp * a.d_out + r], a.zeros[grp * a.d_out + r]};
      const T tj = t[c * cs];
      n_clipped += is_clipped(tj, g, a.maxq);
      const T q = quant_code(tj, g, a.maxq);
      const T Qj = dequant(q, g);
      a.codes[r * d + j] = static_cast<uint8_t>(q);
      a.Q[r * d + j] = Qj;
      if (j < a.k) {
        const T ujj = a.U[j * d + j];
        const T base = a.from_original ? a.W0[r * d + j] : tj;
        err = (base - Qj) / ujj;
        const T res = (tj - Qj) / ujj;
        loss += res * res;
      }
      a.E[c * a.d_out + r] = err;  // 0 past rank: rounded, no feedback
    }
    if (j >= a.k) continue;  // the same for every thread of the block
    err = __shfl_sync(0xffffffffu, err, leader);
    if (!a.static_groups && j % a.gsz == 0) __syncwarp();  // lane 0 read the group's targets: now write
    if (live) {
      const T* u = a.U + j * d;
      for (int64_t l = j + 1 + sub; l < i2; l += kLanes) t[(l - i1) * cs] -= err * u[l];
    }
  }
  if (sub == 0 && live) {
    a.row_loss[r] += loss;
    a.clipped[r] += n_clipped;
  }
}

template <typename T>
void run(const EngineTensors& x, const EngineParams& p) {
  const int64_t d_out = x.Tw.size(0), d = x.Tw.size(1), k = x.U.size(0);
  const int64_t B = p.block_size;
  at::Tensor E = at::zeros({B, d_out}, x.Tw.options());
  Args<T> a{d_out, d, k, p.gsz, p.from_original, p.sym, p.mse, p.static_groups,
            static_cast<T>((1 << p.bits) - 1), x.Tw.data_ptr<T>(), x.Tw.data_ptr<T>(),
            p.from_original ? x.W0.data_ptr<T>() : nullptr, x.U.data_ptr<T>(), x.perm.data_ptr<int64_t>(),
            x.scales.data_ptr<T>(), x.zeros.data_ptr<T>(), x.codes.data_ptr<uint8_t>(), x.Q.data_ptr<T>(),
            E.data_ptr<T>(), x.row_loss.data_ptr<T>(), x.clipped.data_ptr<int64_t>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (d_out == 0 || d == 0) return;
  if (p.static_groups) {
    const int64_t G = (d + p.gsz - 1) / p.gsz, n = d_out * G;
    static_grids_kernel<T><<<static_cast<unsigned>((n + 127) / 128), 128, 0, stream>>>(a, x.Wc.data_ptr<T>(), G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned n_tiles = static_cast<unsigned>((d_out + kRows - 1) / kRows);
  for (int64_t i1 = 0; i1 < d;) {
    const int64_t i2 = block_end(i1, B, d, p.gsz, p.static_groups);
    const size_t bytes = static_cast<size_t>(kStride) * (i2 - i1) * sizeof(T);
    const bool in_shared = bytes <= kSharedBytes;
    block_kernel<T><<<n_tiles, kThreads, in_shared ? bytes : 0, stream>>>(a, i1, i2, in_shared);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Lazy batch update on cuBLAS: T[:, i2:] −= E[:kb]ᵀ · U[i1:i1+kb, i2:] (E is stored (B, d_out)).
    const int64_t kb = std::max<int64_t>(0, std::min(i2, k) - i1);
    if (i2 < d && kb > 0)
      x.Tw.narrow(1, i2, d - i2)
          .addmm_(E.narrow(0, 0, kb).t(), x.U.narrow(0, i1, kb).narrow(1, i2, d - i2), 1, -1);
    i1 = i2;
  }
}

}  // namespace

void gptq_engine_cuda(const EngineTensors& t, const EngineParams& p) {
  const c10::cuda::CUDAGuard guard(t.Tw.device());
  TORCH_CHECK(t.Tw.is_contiguous() && t.U.is_contiguous() && t.perm.is_contiguous(),
              "lrgptq.gptq_quantize (CUDA): internal error, the engine's buffers must be contiguous");
  if (t.Tw.scalar_type() == at::kDouble) {
    run<double>(t, p);
  } else {
    TORCH_CHECK(t.Tw.scalar_type() == at::kFloat, "lrgptq.gptq_quantize: W must be float32 or float64 on CUDA");
    run<float>(t, p);
  }
}

}  // namespace lrgptq
