// How the GPTQ engine cuts the columns into blocks (docs/design.md §4), shared by the CPU and CUDA engines.
#pragma once
#include <algorithm>
#include <cstdint>

namespace lrgptq {

// End of the block that starts at i1: at most B columns, cut at a group start whose group
// would reach past the block (so that group's params see every update from columns before it).
// A group that starts inside (i1, i2) therefore ends by i2; only the group starting at i1 may
// reach past the block.
inline int64_t block_end(int64_t i1, int64_t B, int64_t d, int64_t gsz, bool static_groups) {
  int64_t i2 = std::min(i1 + B, d);
  if (static_groups) return i2;
  for (int64_t g = (i1 / gsz + 1) * gsz; g < i2; g += gsz)
    if (std::min(g + gsz, d) > i2) return g;
  return i2;
}

}  // namespace lrgptq
