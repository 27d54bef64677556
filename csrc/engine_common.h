// What every error-feedback engine shares (docs/design.md §4): the one input check of (W, perm, U),
// and the lazy-update block loop
//   for each block [i1, i2):  prepare(i1, i2);
//                             step(i1, i2, r0, r1) for tiles of rows, in parallel  (the hot loop)
//                             T[:, i2:] −= E_block · U[i1:i2, i2:]                 (one GEMM)
// into which the scalar step and the block-LDLQ step (csrc/gptq.cpp) and the VQ step (csrc/vq.cpp)
// plug. The CUDA engine (csrc/cuda/gptq.cu) runs the same loop with a kernel per block.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "checks.h"

namespace lrgptq {

constexpr int64_t kEngineRowTile = 16;  // rows whose block segment (16 × B values) stays in L1

// fn(r0, r1) for tiles of kEngineRowTile rows of 0..d_out, in parallel.
template <typename F>
void for_row_tiles(int64_t d_out, const F& fn) {
  const int64_t n_tiles = (d_out + kEngineRowTile - 1) / kEngineRowTile;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile)
      fn(tile * kEngineRowTile, std::min((tile + 1) * kEngineRowTile, d_out));
  });
}

// T[:, i2:] −= E[:, :kb] · U[i1:i1+kb, i2:] with kb the block's columns below rank k: one GEMM.
inline void lazy_update(at::Tensor& Tw, const at::Tensor& E, const at::Tensor& U, int64_t i1, int64_t i2,
                        int64_t k) {
  const int64_t d = Tw.size(1), kb = std::max<int64_t>(0, std::min(i2, k) - i1);
  if (i2 < d && kb > 0)
    Tw.narrow(1, i2, d - i2).addmm_(E.narrow(1, 0, kb), U.narrow(0, i1, kb).narrow(1, i2, d - i2), 1, -1);
}

// The block loop of docs/design.md §4 over the targets Tw (d_out, d): block_end(i1) is the engine's
// rule for where the block starting at i1 ends, prepare(i1, i2) runs once per block before its rows
// (codebook fits, ...), step(i1, i2, r0, r1) takes rows [r0, r1) through the block's columns and
// leaves their scaled errors in E (d_out, B), which the lazy update then applies to the later columns.
template <typename End, typename Prepare, typename Step>
void block_loop(at::Tensor& Tw, const at::Tensor& E, const at::Tensor& U, int64_t k, const End& block_end,
                const Prepare& prepare, const Step& step) {
  const int64_t d_out = Tw.size(0), d = Tw.size(1);
  for (int64_t i1 = 0; i1 < d;) {
    const int64_t i2 = block_end(i1);
    prepare(i1, i2);
    for_row_tiles(d_out, [&](int64_t r0, int64_t r1) { step(i1, i2, r0, r1); });
    lazy_update(Tw, E, U, i1, i2, k);
    i1 = i2;
  }
}

// The engines' first pass over W (CPU): the targets Tw = W[:, perm] (both (d_out, d) row-major),
// and whether every value of W is finite, in one read of W.
template <typename T>
bool gather_targets(const T* W, const int64_t* perm, bool identity, int64_t d_out, int64_t d, T* Tw) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, d_out, 1, [&](int64_t r0, int64_t r1) {
    bool ok = true;
    for (int64_t r = r0; r < r1; ++r) {
      const T* w = W + r * d;
      T* t = Tw + r * d;
      if (identity) {
        std::copy(w, w + d, t);
      } else {
        for (int64_t j = 0; j < d; ++j) t[j] = w[perm[j]];
      }
      ok = finite_span(w, d) && ok;  // the row just read, still in cache
    }
    if (!ok) finite = false;
  });
  return finite;
}

// The engines' last pass (CPU): X (rows, d) from perm order back to the original column order, in
// place, row by row through a temporary row that stays in cache. The engines write each row's
// outputs in the order they compute them; scattering them to perm[j] there instead would touch a
// new cache line per value (measured: 1.3x the engine's time with a random order at 4096²).
template <typename T>
void unpermute_rows(T* X, const int64_t* perm, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<T> row(d);
    for (int64_t r = r0; r < r1; ++r) {
      T* x = X + r * d;
      std::copy(x, x + d, row.begin());
      for (int64_t j = 0; j < d; ++j) x[perm[j]] = row[j];
    }
  });
}

// The inputs every engine takes, checked once: W (d_out, d) in the compute dtype, perm a permutation
// of 0..d-1, U (k, d) upper triangular with nonzero pivots, all on one device. W's values are
// checked where the engine first reads them (check_finite here, or the CPU engines' gather).
inline void check_engine_inputs(const char* op, const at::Tensor& W, const at::Tensor& perm, const at::Tensor& U) {
  TORCH_CHECK(W.dim() == 2, "lrgptq.", op, ": W must be 2-D (d_out, d), got shape ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kDouble || W.scalar_type() == at::kFloat, "lrgptq.", op,
              ": W must be float32 or float64 (the compute dtype), got ", W.scalar_type());
  const int64_t d = W.size(1);
  TORCH_CHECK(perm.device() == W.device() && U.device() == W.device(), "lrgptq.", op,
              ": W, perm and U must be on one device, got W on ", W.device(), ", perm on ", perm.device(),
              ", U on ", U.device(), "; move them with .to(W.device)");
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == d && perm.scalar_type() == at::kLong, "lrgptq.", op,
              ": perm must be an int64 vector of length d = ", d, ", got ", perm.scalar_type(), " of shape ",
              perm.sizes());
  TORCH_CHECK(d == 0 || at::equal(std::get<0>(at::sort(perm)), at::arange(d, perm.options())), "lrgptq.", op,
              ": perm must be a permutation of 0..d-1");
  TORCH_CHECK(U.dim() == 2 && U.size(1) == d && U.size(0) <= d, "lrgptq.", op,
              ": U must be (k, d) with k <= d = ", d, ", got shape ", U.sizes());
  check_float(U, op, "U");
  check_finite(U, op, "U");
  TORCH_CHECK(U.size(0) == 0 || (U.diagonal() != 0).all().item<bool>(), "lrgptq.", op,
              ": U has a zero pivot U_jj; the factor route must put columns past rank last");
}

}  // namespace lrgptq
