// The Gram matrix of a factor, on its upper triangle (docs/design.md §2): H ← β·H + AᵀA by column
// panels J = [j0, j1): H[:j1, J] = β·H[:j1, J] + A[:r, :j1]ᵀ A[:r, J], with r = j1 when A is upper
// triangular (its rows past j1 are zero in J: a third of the square GEMM's flops) and every row of A
// otherwise (half). Each panel is mirrored below, so H comes out exactly symmetric.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace lrgptq {

inline void gram_upper(at::Tensor H, const at::Tensor& A, bool triangular, double beta) {
  const int64_t d = H.size(0), nb = 256;
  for (int64_t j0 = 0; j0 < d; j0 += nb) {
    const int64_t w = std::min(nb, d - j0), j1 = j0 + w;
    const at::Tensor rows = triangular ? A.narrow(0, 0, j1) : A;
    H.narrow(0, 0, j1).narrow(1, j0, w).addmm_(rows.narrow(1, 0, j1).t(), rows.narrow(1, j0, w), beta, 1.0);
    at::Tensor diag = H.narrow(0, j0, w).narrow(1, j0, w);
    diag.copy_(at::triu(diag) + at::triu(diag, 1).t());
    H.narrow(0, j0, w).narrow(1, 0, j0).copy_(H.narrow(0, 0, j0).narrow(1, j0, w).t());
  }
}

}  // namespace lrgptq
