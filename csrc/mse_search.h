// GPTQ's MSE search of a group's range on the CPU (docs/design.md §4): among the ranges shrunk by
// p = 1 − i/100 (i < 80), the grid with the least Σ_t |dequant(quant(x_t)) − x_t|^2.4, the first
// (widest) of equal losses winning. quantizer.h's find_grid_fn is the same search with libm's pow
// (the CUDA engine's); here |e|^2.4 is pow_2_4 below, which the compiler vectorises in each
// instruction-set clone, so that the search costs about what the rounding does.
#pragma once
#include <cstdint>

#include "quantizer.h"

namespace lrgptq {

// The grid for the n contiguous values x[0..n) (one row of one group).
Grid<float> mse_grid(const float* x, int64_t n, float maxq, bool sym);
Grid<double> mse_grid(const double* x, int64_t n, double maxq, bool sym);

// out[i] = e[i]^2.4 for e[i] ≥ 0 (0 for e below the smallest normal number), within a few ulps;
// for the accuracy test.
void pow_2_4(const float* e, int64_t n, float* out);
void pow_2_4(const double* e, int64_t n, double* out);

}  // namespace lrgptq
