// The uniform grid of GPTQ's quantizer (docs/design.md §4): per row and group,
//   scale = (xmax − xmin)/maxq, zero = round(−xmin/scale) (sym: 2^(bits−1)),
//   q = clamp(round(x/scale) + zero, 0, maxq), dequant = scale·(q − zero).
// Rounding is half-to-even (nearbyint in the default mode), as torch.round: round_even below.
// Shared by the CPU engine and the CUDA engine (LRGPTQ_HD): the same operations in the same order,
// so in float64 both give the same grids bit for bit (the MSE search's pow excepted: CUDA's pow
// is not correctly rounded, so a near-tie between two shrink factors may go the other way).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "hd.h"

namespace lrgptq {

template <typename T>
struct Grid {
  T scale;
  T zero;
};

// std::nearbyint in the default rounding mode (half to even), bit for bit, -0 included, without the
// libm call that baseline x86-64 (no SSE4.1 rounding instruction) makes of it on the CPU: for
// |x| < 2^p (p: the significand's fraction bits, 52 or 23), |x| + 2^p lies where the spacing of the
// numbers is 1, so the addition rounds |x| to an integer half to even and subtracting 2^p is exact;
// larger |x| are integers already (NaN and Inf pass through). The sign is copied back.
template <typename T>
LRGPTQ_HD inline T round_even(T x) {
#ifdef __CUDA_ARCH__
  return nearbyint(x);
#else
  constexpr T two_p = T(1) / std::numeric_limits<T>::epsilon();
  const T a = std::abs(x);
  return std::copysign(a < two_p ? (a + two_p) - two_p : a, x);
#endif
}

// The unclamped code round(x/scale) + zero.
template <typename T>
LRGPTQ_HD inline T raw_code(T x, const Grid<T>& g) {
  return round_even(x / g.scale) + g.zero;
}

template <typename T>
LRGPTQ_HD inline T clamp_code(T c, T maxq) {
  return std::min(std::max(c, T(0)), maxq);
}

template <typename T>
LRGPTQ_HD inline T quant_code(T x, const Grid<T>& g, T maxq) {
  return clamp_code(raw_code(x, g), maxq);
}

// Clipping: x's rounded code falls outside 0..maxq, so quant_code clamps it.
template <typename T>
LRGPTQ_HD inline bool is_clipped(T x, const Grid<T>& g, T maxq) {
  const T c = raw_code(x, g);
  return c < 0 || c > maxq;
}

template <typename T>
LRGPTQ_HD inline T dequant(T q, const Grid<T>& g) {
  return g.scale * (q - g.zero);
}

// Min-max range that contains 0; symmetric ranges mirror the larger side.
template <typename T>
LRGPTQ_HD inline Grid<T> grid_from_range(T xmin, T xmax, T maxq, bool sym) {
  Grid<T> g;
  g.scale = (xmax - xmin) / maxq;
  g.zero = sym ? round_even((maxq + 1) / 2) : round_even(-xmin / g.scale);
  return g;
}

// The min-max range of the n values x(0..n) (x: pointer or index -> value), widened to contain 0;
// symmetric ranges mirror the larger side; an all-zero group gets [−1, 1].
template <typename T>
struct Range {
  T lo, hi;
};

template <typename T, typename X>
LRGPTQ_HD inline Range<T> group_range(const X& x, int64_t n, bool sym) {
  T xmin = 0, xmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    xmin = std::min(xmin, x(i));
    xmax = std::max(xmax, x(i));
  }
  if (sym) {
    xmax = std::max(-xmin, xmax);
    if (xmin < 0) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  return {xmin, xmax};
}

// The MSE search's candidates (GPTQ's): the range shrunk by p = 1 − i/100, i < kShrinkSteps.
constexpr int kShrinkSteps = 80;

template <typename T>
LRGPTQ_HD inline Grid<T> shrunk_grid(const Range<T>& r, int i, T maxq, bool sym) {
  const T p = T(1) - T(i) / T(100);
  return grid_from_range(p * r.lo, p * r.hi, maxq, sym);
}

// Grid for the n values x(0..n). With mse, the shrunk range with the least Σ|Q(x) − x|^2.4, the
// first (widest) of equal losses winning (GPTQ's search), with libm's pow: the CUDA engine's search.
// The CPU engine searches with csrc/mse_search.h (the same search, a vectorised |e|^2.4).
template <typename T, typename X>
LRGPTQ_HD inline Grid<T> find_grid_fn(const X& x, int64_t n, T maxq, bool sym, bool mse) {
  const Range<T> r = group_range<T>(x, n, sym);
  Grid<T> best = grid_from_range(r.lo, r.hi, maxq, sym);
  if (!mse) return best;
  T best_err = std::numeric_limits<T>::infinity();
  for (int i = 0; i < kShrinkSteps; ++i) {
    const Grid<T> g = shrunk_grid(r, i, maxq, sym);
    T err = 0;
    for (int64_t t = 0; t < n; ++t) err += std::pow(std::abs(dequant(quant_code(x(t), g, maxq), g) - x(t)), T(2.4));
    if (err < best_err) {
      best_err = err;
      best = g;
    }
  }
  return best;
}

// The smallest grid whose rounding never clamps a value of [xmin, xmax] (widened to contain 0):
// every x must satisfy −1/2 < x/scale + zero < maxq + 1/2, so for a zero z the scale is
//   scale(z) = max(−xmin/(z + 1/2), xmax/(maxq − z + 1/2)),
// minimised over integer z in 0..maxq (sym: z = 2^(bits−1)), then raised a few ulps so that a value
// on the edge cannot round outwards. |x − dequant(quant(x))| ≤ scale/2 on the whole range.
template <typename T>
inline Grid<T> covering_grid(T xmin, T xmax, T maxq, bool sym) {
  xmin = std::min(xmin, T(0));
  xmax = std::max(xmax, T(0));
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  auto scale_for = [&](T z) { return std::max(-xmin / (z + T(0.5)), xmax / (maxq - z + T(0.5))); };
  Grid<T> best{scale_for(round_even((maxq + 1) / 2)), round_even((maxq + 1) / 2)};
  if (!sym) {
    for (T z = 0; z <= maxq; z += 1) {
      const T s = scale_for(z);
      if (s < best.scale) best = {s, z};
    }
  }
  best.scale *= T(1) + T(16) * std::numeric_limits<T>::epsilon();
  return best;
}

}  // namespace lrgptq
