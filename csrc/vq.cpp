// GPTVQ: vector quantization with error feedback (arXiv 2402.15319; docs/design.md §5): the VQ step
// of the one block loop (csrc/engine_common.h).
//
// Columns, in perm order, are taken D at a time (D ∈ {1, 2, 4}). With targets T (initially
// W[:, perm]) and Ū = U[j:j+D, j:j+D] (the D×D diagonal block of the factor, H⁻¹ = UᵀU):
//   q = argmin_c ‖(t − c)·Ū⁻¹‖²          (the OBS loss of fixing the D columns jointly: the
//                                          D×D block of H⁻¹ restricted to columns ≥ j is ŪᵀŪ)
//   E·Ū = base − q  (forward substitution; base = t, or the original w for the ql form, D = 1 only)
//   T[:, l] −= E · U[j:j+D, l]  for l ≥ j + D (inside the block; one GEMM for the columns after it)
//   loss += ‖(t − q)·Ū⁻¹‖².
// With D = 1 every step is GPTQ's (docs/design.md §4), operation for operation.
//
// Codebooks: K = 2^(bits·D) centroids of D values per (column group × row group); gc columns
// (a multiple of D) by gr rows. At a column group's first column (always a block start, so every
// earlier update has reached the group), each of its codebooks is fitted by EM to the group's
// current targets, minimising Σ_p ‖(t_p − c)·Ū_p⁻¹‖² (Ū_p the block of point p's columns):
//   E-step: nearest centroid in that weighted distance;
//   M-step: c = (Σ_p M_p)⁻¹ Σ_p M_p t_p over the cluster, M_p = Ū_p⁻¹Ū_p⁻ᵀ (the exact minimiser;
//           for D = 1 it is the 1/U_jj²-weighted mean);
// from a product grid (2^bits levels per coordinate, centres of equal bins of each coordinate's
// range). Both steps minimise one objective, so it never increases; its value before the first
// and after every iteration is returned. Then, optionally, the codebook is rounded to int8 with
// one float16 scale s = max|c|/127 (C = s·C8, exact in float32), and the engine assigns against
// the rounded codebook, so a checkpoint of (C8, s) reproduces Q bit for bit.
// Columns past the factor's rank (j ≥ k) are assigned in the plain distance and feed nothing back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "clones.h"
#include "engine_common.h"

namespace lrgptq {
namespace {

using VQOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kMaxD = 4;

template <typename T>
struct Problem {
  int64_t d_out, d, k, D, K, gc, gr, Gc, Gr, em_iters;
  bool from_original, int8;
  T* Tw;               // targets (d_out, d), perm order
  const T* W;          // original weights (d_out, d), original order (read by the ql form)
  const int64_t* perm; // column j (perm order) is W's column perm[j]
  const T* U;          // (k, d)
  const T* Linv;       // (d/D, D, D): Ū⁻¹ of each column block (identity rows past rank)
  T* C;                // codebooks (Gc, Gr, K, D)
  T* cscale;           // (Gc, Gr) int8 scales (0 when not rounded)
  T* CP;               // (Gr, B/D, D, K): (C·Ū⁻¹)ᵀ for the current block
  int32_t* codes;      // (d_out, d/D)
  T* Q;                // (d_out, d), perm order (unpermute_rows at the end)
  T* E;                // (d_out, B)
  int64_t ldE;
  T* row_loss;         // (d_out)
  T* trace;            // (Gc, Gr, em_iters + 1)
};

// y = t·L for an upper-triangular D×D L (row-major): y_a = Σ_{b ≤ a} t_b L_ba.
template <typename T>
inline void times_upper(const T* t, const T* L, int64_t D, T* y) {
  for (int64_t a = 0; a < D; ++a) {
    T s = 0;
    for (int64_t b = 0; b <= a; ++b) s += t[b] * L[b * D + a];
    y[a] = s;
  }
}

// Squared distances of y to K transformed centroids stored coordinate-major (CPt[a·K + c]): one
// pass per coordinate, vectorised over the centroids; each sum runs a = 0, 1, ... as written.
template <typename T>
LRGPTQ_INLINE void sq_dists_body(const T* __restrict y, const T* __restrict CPt, int64_t K, int64_t D,
                          T* __restrict dist) {
  for (int64_t c = 0; c < K; ++c) {
    const T r = y[0] - CPt[c];
    dist[c] = r * r;
  }
  for (int64_t a = 1; a < D; ++a) {
    const T ya = y[a];
    const T* p = CPt + a * K;
    for (int64_t c = 0; c < K; ++c) {
      const T r = ya - p[c];
      dist[c] += r * r;
    }
  }
}
LRGPTQ_CLONES void sq_dists(const float* y, const float* CPt, int64_t K, int64_t D, float* dist) {
  sq_dists_body(y, CPt, K, D, dist);
}
LRGPTQ_CLONES void sq_dists(const double* y, const double* CPt, int64_t K, int64_t D, double* dist) {
  sq_dists_body(y, CPt, K, D, dist);
}

// Nearest centroid to y in the Euclidean distance (first on ties); dist: K scratch values.
template <typename T>
inline int64_t nearest(const T* y, const T* CPt, int64_t K, int64_t D, T* dist, T* best_dist) {
  sq_dists(y, CPt, K, D, dist);
  int64_t best = 0;
  for (int64_t c = 1; c < K; ++c)
    if (dist[c] < dist[best]) best = c;
  *best_dist = dist[best];
  return best;
}

// CPt = (C·L)ᵀ for a codebook C (K, D) and an upper-triangular L: the centroids in the
// transformed space, coordinate-major.
template <typename T>
void transform_codebook(const T* C, const T* L, int64_t K, int64_t D, T* CPt) {
  for (int64_t c = 0; c < K; ++c) {
    T y[kMaxD];
    times_upper(C + c * D, L, D, y);
    for (int64_t a = 0; a < D; ++a) CPt[a * K + c] = y[a];
  }
}

// Ū⁻¹ of every column block: Ū = U[j:j+D, j:j+D] with rows past rank k replaced by identity rows.
template <typename T>
void block_inverses(const at::Tensor& U, int64_t k, int64_t D, at::Tensor& Linv) {
  const int64_t d = U.size(1), nb = d / D;
  const T* u = U.data_ptr<T>();
  T* L = Linv.data_ptr<T>();
  for (int64_t jb = 0; jb < nb; ++jb) {
    const int64_t j = jb * D;
    T Ub[kMaxD * kMaxD] = {};
    for (int64_t a = 0; a < D; ++a)
      for (int64_t b = 0; b < D; ++b)
        Ub[a * D + b] = (j + a < k) ? (b >= a ? u[(j + a) * d + j + b] : T(0)) : T(a == b);
    // Back substitution, column by column: Ū·X = I.
    T* X = L + jb * D * D;
    for (int64_t col = 0; col < D; ++col)
      for (int64_t a = D - 1; a >= 0; --a) {
        T s = T(a == col);
        for (int64_t b = a + 1; b < D; ++b) s -= Ub[a * D + b] * X[b * D + col];
        X[a * D + col] = s / Ub[a * D + a];
      }
  }
}

// Solves the D×D SPD system A·x = b in place (Cholesky); false when A is not positive definite.
template <typename T>
bool spd_solve(T* A, T* b, int64_t D) {
  for (int64_t i = 0; i < D; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      T s = A[i * D + j];
      for (int64_t l = 0; l < j; ++l) s -= A[i * D + l] * A[j * D + l];
      if (i == j) {
        if (!(s > 0)) return false;
        A[i * D + i] = std::sqrt(s);
      } else {
        A[i * D + j] = s / A[j * D + j];
      }
    }
  }
  for (int64_t i = 0; i < D; ++i) {
    T s = b[i];
    for (int64_t l = 0; l < i; ++l) s -= A[i * D + l] * b[l];
    b[i] = s / A[i * D + i];
  }
  for (int64_t i = D - 1; i >= 0; --i) {
    T s = b[i];
    for (int64_t l = i + 1; l < D; ++l) s -= A[l * D + i] * b[l];
    b[i] = s / A[i * D + i];
  }
  return true;
}

// One codebook's EM fit on rows [r0, r1) × columns [c0, c1) of the current targets.
template <typename T>
void fit_codebook(const Problem<T>& P, int64_t cg, int64_t rg, int64_t bits) {
  const int64_t D = P.D, K = P.K, d = P.d;
  const int64_t r0 = rg * P.gr, r1 = std::min(r0 + P.gr, P.d_out);
  const int64_t c0 = cg * P.gc, c1 = std::min(c0 + P.gc, d);
  T* C = P.C + (cg * P.Gr + rg) * K * D;
  // Initial centroids: the product grid of 2^bits bin centres per coordinate.
  T lo[kMaxD], hi[kMaxD];
  std::fill(lo, lo + D, std::numeric_limits<T>::infinity());
  std::fill(hi, hi + D, -std::numeric_limits<T>::infinity());
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = c0; j < c1; ++j) {
      const T v = P.Tw[r * d + j];
      lo[(j - c0) % D] = std::min(lo[(j - c0) % D], v);
      hi[(j - c0) % D] = std::max(hi[(j - c0) % D], v);
    }
  const int64_t L = int64_t(1) << bits;
  for (int64_t c = 0; c < K; ++c)
    for (int64_t a = 0, i = c; a < D; ++a, i /= L)
      C[c * D + a] = lo[a] + (hi[a] - lo[a]) * (T(i % L) + T(0.5)) / T(L);

  const int64_t nb = (c1 - c0) / D;
  std::vector<T> CP(K * D), A(K * D * D), bvec(K * D), M(nb * D * D), scratch(K);
  std::vector<int64_t> n(K);
  for (int64_t jb = 0; jb < nb; ++jb) {  // M_j = Ū⁻¹Ū⁻ᵀ
    const T* Li = P.Linv + (c0 / D + jb) * D * D;
    for (int64_t a = 0; a < D; ++a)
      for (int64_t b = 0; b < D; ++b) {
        T s = 0;
        for (int64_t l = 0; l < D; ++l) s += Li[a * D + l] * Li[b * D + l];
        M[jb * D * D + a * D + b] = s;
      }
  }
  T* trace = P.trace + (cg * P.Gr + rg) * (P.em_iters + 1);
  for (int64_t it = 0; it <= P.em_iters; ++it) {
    const bool update = it < P.em_iters;
    std::fill(A.begin(), A.end(), T(0));
    std::fill(bvec.begin(), bvec.end(), T(0));
    std::fill(n.begin(), n.end(), 0);
    T obj = 0;
    for (int64_t jb = 0; jb < nb; ++jb) {
      const int64_t j = c0 + jb * D;
      const T* Li = P.Linv + (j / D) * D * D;
      const T* Mj = M.data() + jb * D * D;
      transform_codebook(C, Li, K, D, CP.data());
      for (int64_t r = r0; r < r1; ++r) {
        const T* t = P.Tw + r * d + j;
        T y[kMaxD], dist;
        times_upper(t, Li, D, y);
        const int64_t c = nearest(y, CP.data(), K, D, scratch.data(), &dist);
        obj += dist;
        if (!update) continue;
        ++n[c];
        for (int64_t a = 0; a < D; ++a)
          for (int64_t b = 0; b < D; ++b) {
            A[c * D * D + a * D + b] += Mj[a * D + b];
            bvec[c * D + a] += Mj[a * D + b] * t[b];
          }
      }
    }
    trace[it] = obj;
    if (!update) break;
    for (int64_t c = 0; c < K; ++c)  // an empty cluster keeps its centroid
      if (n[c] > 0 && spd_solve(A.data() + c * D * D, bvec.data() + c * D, D))
        std::copy(bvec.data() + c * D, bvec.data() + (c + 1) * D, C + c * D);
  }
  if (P.int8) {  // C = s·C8, s a float16 number, C8 in [−127, 127]
    T amax = 0;
    for (int64_t i = 0; i < K * D; ++i) amax = std::max(amax, std::abs(C[i]));
    T s = static_cast<T>(static_cast<float>(c10::Half(static_cast<float>(amax / 127))));
    if (!(s > 0)) s = static_cast<T>(std::ldexp(1.0f, -24));  // float16's least positive number
    for (int64_t i = 0; i < K * D; ++i) C[i] = s * std::min(std::max(std::nearbyint(C[i] / s), T(-127)), T(127));
    P.cscale[cg * P.Gr + rg] = s;
  }
}

// The VQ step: rows [r0, r1) through the block columns [i1, i2), D columns at a time.
template <typename T>
void vq_step(const Problem<T>& P, int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
  const int64_t d = P.d, D = P.D, K = P.K, nbB = P.ldE / D;
  const int64_t cg = i1 / P.gc;
  std::vector<T> scratch(K);
  for (int64_t r = r0; r < r1; ++r) {
    T* t = P.Tw + r * d;
    T* e = P.E + r * P.ldE;
    const int64_t rg = r / P.gr;
    const T* Cb = P.C + (cg * P.Gr + rg) * K * D;
    T loss = 0;
    for (int64_t j = i1; j < i2; j += D) {
      const int64_t jl = (j - i1) / D;
      const T* Li = P.Linv + (j / D) * D * D;
      T y[kMaxD], dist;
      times_upper(t + j, Li, D, y);
      const int64_t c = nearest(y, P.CP + (rg * nbB + jl) * K * D, K, D, scratch.data(), &dist);
      const T* q = Cb + c * D;
      P.codes[r * (d / D) + j / D] = static_cast<int32_t>(c);
      T res[kMaxD], err[kMaxD];
      for (int64_t a = 0; a < D; ++a) {
        P.Q[r * d + j + a] = q[a];
        res[a] = t[j + a] - q[a];
        err[a] = (P.from_original ? P.W[r * d + P.perm[j + a]] : t[j + a]) - q[a];
      }
      // E·Ū = base − q and R·Ū = t − q by forward substitution; nothing past rank.
      for (int64_t a = 0; a < D; ++a) {
        if (j + a >= P.k) {
          err[a] = res[a] = 0;
          continue;
        }
        const T* u = P.U + (j + a) * d;
        for (int64_t b = 0; b < a; ++b) {
          err[a] -= err[b] * P.U[(j + b) * d + j + a];
          res[a] -= res[b] * P.U[(j + b) * d + j + a];
        }
        err[a] = err[a] / u[j + a];
        res[a] = res[a] / u[j + a];
        loss += res[a] * res[a];
      }
      for (int64_t a = 0; a < D; ++a) {
        e[j - i1 + a] = err[a];
        if (j + a >= P.k) continue;
        const T* u = P.U + (j + a) * d;
        for (int64_t l = j + D; l < i2; ++l) t[l] -= err[a] * u[l];
      }
    }
    P.row_loss[r] += loss;
  }
}

// The engine: the block loop of csrc/engine_common.h with the VQ step.
template <typename T>
void run_engine(Problem<T>& P, at::Tensor& Tw, const at::Tensor& U, const at::Tensor& E, int64_t B,
                bool fit, int64_t bits) {
  const int64_t nbB = B / P.D;
  // Every column group starts a block: its codebooks see the fully updated targets.
  const auto end = [&](int64_t i1) { return std::min({i1 + B, P.d, (i1 / P.gc + 1) * P.gc}); };
  const auto prepare = [&](int64_t i1, int64_t i2) {
    const int64_t cg = i1 / P.gc;
    if (fit && i1 % P.gc == 0)
      at::parallel_for(0, P.Gr, 1, [&](int64_t g0, int64_t g1) {
        for (int64_t rg = g0; rg < g1; ++rg) fit_codebook(P, cg, rg, bits);
      });
    // C·Ū⁻¹ for every row group and column block of this block.
    at::parallel_for(0, P.Gr, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t rg = g0; rg < g1; ++rg)
        for (int64_t j = i1; j < i2; j += P.D) {
          const T* Cb = P.C + (cg * P.Gr + rg) * P.K * P.D;
          transform_codebook(Cb, P.Linv + (j / P.D) * P.D * P.D, P.K, P.D,
                             P.CP + (rg * nbB + (j - i1) / P.D) * P.K * P.D);
        }
    });
  };
  block_loop(Tw, E, U, P.k, end, prepare,
             [&](int64_t i1, int64_t i2, int64_t r0, int64_t r1) { vq_step(P, i1, i2, r0, r1); });
}

struct Shape {
  int64_t d_out, d, D, K, gc, gr, Gc, Gr;
};

Shape vq_shape(const at::Tensor& W, int64_t dim, int64_t bits, int64_t group_cols, int64_t group_rows) {
  constexpr const char* op = "lrgptq.vq_quantize";
  TORCH_CHECK(W.dim() == 2, op, ": W must be 2-D (d_out, d), got shape ", W.sizes());  // also for Meta
  TORCH_CHECK(dim == 1 || dim == 2 || dim == 4, op, ": dim (the codebook dimension D) must be 1, 2 or 4, got ", dim);
  TORCH_CHECK(bits >= 1 && bits * dim <= 12, op, ": bits per weight must be >= 1 with bits·dim <= 12 (K = 2^(bits·dim) <= 4096 centroids), got bits=", bits, " dim=", dim);
  const int64_t d_out = W.size(0), d = W.size(1);
  TORCH_CHECK(d % dim == 0, op, ": in_features d = ", d, " must be a multiple of dim = ", dim,
              "; use dim 1 or 2 for this layer");
  TORCH_CHECK(group_cols == -1 || (group_cols > 0 && group_cols % dim == 0), op,
              ": group_cols must be -1 (all columns) or a positive multiple of dim = ", dim, ", got ", group_cols);
  TORCH_CHECK(group_rows == -1 || group_rows > 0, op, ": group_rows must be -1 (all rows) or positive, got ",
              group_rows);
  const int64_t gc = group_cols == -1 ? std::max<int64_t>(d, dim) : group_cols;
  const int64_t gr = group_rows == -1 ? std::max<int64_t>(d_out, 1) : group_rows;
  return {d_out, d, dim, int64_t(1) << (bits * dim), gc, gr, (d + gc - 1) / gc, (d_out + gr - 1) / gr};
}

// The codebooks' own settings (W, perm and U: check_engine_inputs).
void check_settings(const Shape& S, const std::optional<at::Tensor>& codebooks, int64_t em_iters,
                    int64_t block_size, bool from_original) {
  constexpr const char* op = "lrgptq.vq_quantize";
  TORCH_CHECK(block_size >= S.D, op, ": block_size must be >= dim = ", S.D, ", got ", block_size);
  TORCH_CHECK(em_iters >= 0, op, ": em_iters must be >= 0, got ", em_iters);
  // The ql form's loss couples a block's columns through L's D×D block around targets other than
  // T, so the joint assignment here (weighted by Ū⁻¹, around T) holds for D = 1 only.
  TORCH_CHECK(!from_original || S.D == 1, op, ": from_original (the ql form) supports dim = 1 only, got dim = ",
              S.D, "; use route 'cholesky' or 'svdqr' for vector quantization");
  if (codebooks) {
    TORCH_CHECK(codebooks->dim() == 4 && codebooks->size(0) == S.Gc && codebooks->size(1) == S.Gr &&
                    codebooks->size(2) == S.K && codebooks->size(3) == S.D,
                op, ": codebooks must have shape (column groups, row groups, K, dim) = (", S.Gc, ", ", S.Gr, ", ",
                S.K, ", ", S.D, "), got ", codebooks->sizes());
    check_float(*codebooks, "vq_quantize", "codebooks");
    check_finite(*codebooks, "vq_quantize", "codebooks");
  }
}

VQOut vq_quantize(const at::Tensor& W, const at::Tensor& perm, const at::Tensor& U_in, bool from_original,
                  int64_t dim, int64_t bits, int64_t group_cols, int64_t group_rows, int64_t em_iters,
                  bool codebook_int8, const std::optional<at::Tensor>& codebooks, int64_t block_size) {
  check_engine_inputs("vq_quantize", W, perm, U_in);
  const Shape S = vq_shape(W, dim, bits, group_cols, group_rows);
  check_settings(S, codebooks, em_iters, block_size, from_original);
  const auto opts = W.options();
  at::Tensor perm_c = perm.contiguous();
  const bool identity = at::equal(perm_c, at::arange(S.d, perm.options()));
  at::Tensor Wc = W.contiguous();
  at::Tensor Tw = at::empty_like(Wc);
  at::Tensor U = U_in.to(W.scalar_type()).contiguous();
  const bool fit = !codebooks.has_value();
  at::Tensor C = fit ? at::zeros({S.Gc, S.Gr, S.K, S.D}, opts) : codebooks->to(W.scalar_type()).contiguous().clone();
  at::Tensor cscale = at::zeros({S.Gc, S.Gr}, opts);
  at::Tensor trace = at::zeros({S.Gc, S.Gr, fit ? em_iters + 1 : 0}, opts);
  const int64_t B = std::max<int64_t>(S.D, std::min(block_size, std::max<int64_t>(S.d, 1)) / S.D * S.D);
  at::Tensor CP = at::empty({S.Gr, B / S.D, S.K, S.D}, opts);
  at::Tensor Linv = at::empty({S.d / S.D, S.D, S.D}, opts);
  at::Tensor codes = at::empty({S.d_out, S.d / S.D}, opts.dtype(at::kInt));
  at::Tensor Q = at::empty({S.d_out, S.d}, opts);
  at::Tensor E = at::zeros({S.d_out, B}, opts);
  at::Tensor row_loss = at::zeros({S.d_out}, opts);

  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "vq_quantize", [&] {
    const scalar_t* w = Wc.data_ptr<scalar_t>();
    const int64_t* pm = perm_c.data_ptr<int64_t>();
    check_finite_found(gather_targets(w, pm, identity, S.d_out, S.d, Tw.data_ptr<scalar_t>()), "vq_quantize", "W");
    block_inverses<scalar_t>(U.size(0) == 0 ? at::zeros({0, S.d}, opts) : U, U.size(0), S.D, Linv);
    Problem<scalar_t> P{S.d_out, S.d, U.size(0), S.D, S.K, S.gc, S.gr, S.Gc, S.Gr, em_iters, from_original,
                        fit && codebook_int8, Tw.data_ptr<scalar_t>(), w, pm, U.data_ptr<scalar_t>(),
                        Linv.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), cscale.data_ptr<scalar_t>(),
                        CP.data_ptr<scalar_t>(), codes.data_ptr<int32_t>(), Q.data_ptr<scalar_t>(),
                        E.data_ptr<scalar_t>(), B, row_loss.data_ptr<scalar_t>(), trace.data_ptr<scalar_t>()};
    run_engine(P, Tw, U, E, B, fit, bits);
    if (!identity) unpermute_rows(Q.data_ptr<scalar_t>(), pm, S.d_out, S.d);
  });
  return {codes, C, cscale, Q, row_loss, trace};
}

VQOut vq_quantize_meta(const at::Tensor& W, const at::Tensor&, const at::Tensor&, bool, int64_t dim, int64_t bits,
                       int64_t group_cols, int64_t group_rows, int64_t em_iters, bool,
                       const std::optional<at::Tensor>& codebooks, int64_t) {
  const Shape S = vq_shape(W, dim, bits, group_cols, group_rows);
  const auto o = W.options();
  return {at::empty({S.d_out, S.d / S.D}, o.dtype(at::kInt)), at::empty({S.Gc, S.Gr, S.K, S.D}, o),
          at::empty({S.Gc, S.Gr}, o), at::empty({S.d_out, S.d}, o), at::empty({S.d_out}, o),
          at::empty({S.Gc, S.Gr, codebooks ? 0 : em_iters + 1}, o)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) { m.impl("vq_quantize", &vq_quantize); }
TORCH_LIBRARY_IMPL(lrgptq, Meta, m) { m.impl("vq_quantize", &vq_quantize_meta); }

}  // namespace lrgptq
