// |e|^2.4 without libm, and the MSE search built on it (csrc/mse_search.h).
//   e = 2^k·m with m in [√½, √2), k = 5a + b (b in 0..4):
//   e^2.4 = e² · e^0.4 = e² · 2^(2a) · 2^(0.4b) · exp(0.4·ln m),
//   ln m = 2·atanh(s) = 2·Σ_i s^(2i+1)/(2i+1) with s = (m − 1)/(m + 1), |s| ≤ 3 − 2√2,
//   exp(r) by its Taylor series, |r| = |0.4·ln m| ≤ 0.2·ln 2.
// Both series are cut where their remainder is below the type's rounding (float: s^9 and r^5,
// double: s^21 and r^11), and summed by Estrin's scheme. The exponent and 2^(2a) go through the
// bits, with the exact integer ↔ floating conversions done by adding 2^p (p fraction bits) so
// that no instruction outside AVX2 is needed, and every branch a select (built with -fno-trapping-math, CMakeLists.txt): the
// loops vectorise in every clone. No FMA contraction (-ffp-contract=off): every clone rounds alike.
#include "mse_search.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "clones.h"

namespace lrgptq {
namespace {

template <typename T>
struct Layout;
template <>
struct Layout<float> {
  using U = uint32_t;
  static constexpr int frac = 23, bias = 127, terms = 5;
};
template <>
struct Layout<double> {
  using U = uint64_t;
  static constexpr int frac = 52, bias = 1023, terms = 11;
};

template <typename T>
LRGPTQ_INLINE typename Layout<T>::U bits_of(T x) {
  typename Layout<T>::U u;
  std::memcpy(&u, &x, sizeof x);
  return u;
}

template <typename T>
LRGPTQ_INLINE T from_bits(typename Layout<T>::U u) {
  T x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// x^H for H a power of two, by squaring.
template <typename T, int H>
LRGPTQ_INLINE T power(T x) {
  if constexpr (H == 1) {
    return x;
  } else {
    const T y = power<T, H / 2>(x);
    return y * y;
  }
}

// Σ_{i<N} c[i]·x^i by Estrin's scheme, p = lo + x^H·hi with H the largest power of two below N:
// log2 N dependent steps instead of Horner's N, so the vector units overlap one element's steps.
template <typename T, int N>
LRGPTQ_INLINE T estrin(const T* c, T x) {
  if constexpr (N == 1) {
    return c[0];
  } else {
    constexpr int H = N > 8 ? 8 : N > 4 ? 4 : N > 2 ? 2 : 1;
    return estrin<T, H>(c, x) + power<T, H>(x) * estrin<T, N - H>(c + H, x);
  }
}

// The series' coefficients: 1/(2i + 1) (atanh) and 1/i! (exp), rounded from double.
template <typename T, int N>
struct Series {
  T atanh[N], exp[N];
  constexpr Series() : atanh(), exp() {
    double f = 1;
    for (int i = 0; i < N; ++i) {
      atanh[i] = T(1.0 / (2 * i + 1));
      if (i > 0) f *= i;
      exp[i] = T(1.0 / f);
    }
  }
};

template <typename T>
LRGPTQ_INLINE T pow_2_4_one(T e) {
  using L = Layout<T>;
  using U = typename L::U;
  static constexpr Series<T, L::terms + 1> c{};
  constexpr U frac_mask = (U(1) << L::frac) - 1;
  const T two_p = T(1) / std::numeric_limits<T>::epsilon();  // 2^p: adding it puts an integer < 2^p in the low bits
  const U u = bits_of(e);
  T m = from_bits<T>((u & frac_mask) | bits_of(T(1)));      // [1, 2)
  const T k_biased = from_bits<T>((u >> L::frac) | bits_of(two_p)) - two_p;  // exponent field, exact
  const bool fold = m > T(1.4142135623730950488);
  m = fold ? m * T(0.5) : m;
  const T k = k_biased - T(L::bias) + (fold ? T(1) : T(0));
  const T a = round_even((k - T(2)) * T(0.2));  // (k − 2)/5 = a + (b − 2)/5, |(b − 2)/5| ≤ 0.4
  const T b = k - T(5) * a;
  const T two_2a = from_bits<T>((bits_of(T(2) * a + T(L::bias) + two_p) & frac_mask) << L::frac);
  T two_04b = T(1);  // 2^(0.4b), b in 0..4
  two_04b = b > T(0.5) ? T(1.3195079107728942593) : two_04b;
  two_04b = b > T(1.5) ? T(1.7411011265922482783) : two_04b;
  two_04b = b > T(2.5) ? T(2.2973967099940700136) : two_04b;
  two_04b = b > T(3.5) ? T(3.0314331330207961647) : two_04b;  // 2^1.6
  const T s = (m - T(1)) / (m + T(1));
  const T r = T(0.8) * s * estrin<T, L::terms>(c.atanh, s * s);  // 0.4·ln m
  const T out = e * e * two_2a * two_04b * estrin<T, L::terms + 1>(c.exp, r);
  return e < std::numeric_limits<T>::min() ? T(0) : out;
}

// Σ_t |dequant(quant(x_t)) − x_t|^2.4 on grid g: the terms into err (a loop the compiler
// vectorises), then summed in 8 lanes in a fixed order.
template <typename T>
LRGPTQ_INLINE T grid_loss(const T* __restrict x, int64_t n, const Grid<T>& g, T maxq, T* __restrict err) {
  for (int64_t t = 0; t < n; ++t) err[t] = pow_2_4_one(std::abs(dequant(quant_code(x[t], g, maxq), g) - x[t]));
  T lane[8] = {};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int l = 0; l < 8; ++l) lane[l] += err[t + l];
  for (int l = 0; t < n; ++t, ++l) lane[l] += err[t];
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

template <typename T>
LRGPTQ_INLINE Grid<T> mse_grid_body(const T* x, int64_t n, T maxq, bool sym) {
  thread_local std::vector<T> err;
  err.resize(n);
  const Range<T> r = group_range<T>([x](int64_t i) { return x[i]; }, n, sym);
  Grid<T> best = grid_from_range(r.lo, r.hi, maxq, sym);
  T best_err = std::numeric_limits<T>::infinity();
  for (int i = 0; i < kShrinkSteps; ++i) {
    const Grid<T> g = shrunk_grid(r, i, maxq, sym);
    const T e = grid_loss(x, n, g, maxq, err.data());
    if (e < best_err) {
      best_err = e;
      best = g;
    }
  }
  return best;
}

template <typename T>
LRGPTQ_INLINE void pow_2_4_body(const T* __restrict e, int64_t n, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = pow_2_4_one(e[i]);
}

}  // namespace

LRGPTQ_CLONES LRGPTQ_FLATTEN Grid<float> mse_grid(const float* x, int64_t n, float maxq, bool sym) {
  return mse_grid_body(x, n, maxq, sym);
}
LRGPTQ_CLONES LRGPTQ_FLATTEN Grid<double> mse_grid(const double* x, int64_t n, double maxq, bool sym) {
  return mse_grid_body(x, n, maxq, sym);
}
LRGPTQ_CLONES LRGPTQ_FLATTEN void pow_2_4(const float* e, int64_t n, float* out) { pow_2_4_body(e, n, out); }
LRGPTQ_CLONES LRGPTQ_FLATTEN void pow_2_4(const double* e, int64_t n, double* out) { pow_2_4_body(e, n, out); }

}  // namespace lrgptq
