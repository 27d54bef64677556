// Counter-based randomness for sketches: every entry of S is a pure function of
// (seed, global token index, row), so runs are reproducible and workers merge by summing.
// Shared by the CPU and CUDA sketches (LRGPTQ_HD), so both draw the same S.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace lrgptq {

// splitmix64 finaliser over the three counters.
LRGPTQ_HD inline uint64_t sketch_hash(uint64_t seed, uint64_t n, uint64_t l) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ULL ^ (n + 0x632BE59BD9B4E019ULL) * 0xBF58476D1CE4E5B9ULL ^
               (l + 1) * 0x94D049BB133111EBULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Standard normal by Box-Muller on two 53-bit uniforms in (0, 1].
LRGPTQ_HD inline double sketch_normal(uint64_t seed, uint64_t n, uint64_t r) {
  const uint64_t h1 = sketch_hash(seed, n, 2 * r), h2 = sketch_hash(seed ^ 0x5851F42D4C957F2DULL, n, 2 * r + 1);
  const double u1 = (static_cast<double>(h1 >> 11) + 1.0) * 0x1.0p-53;
  const double u2 = static_cast<double>(h2 >> 11) * 0x1.0p-53;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

}  // namespace lrgptq
