// The two steps every error-feedback engine shares (docs/design.md §4): rows through a block in tiles
// that stay in L1, split across threads, and the lazy batch update after the block.
// Used by the scalar engine (csrc/gptq.cpp) and the vector one (csrc/vq.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

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

}  // namespace lrgptq
