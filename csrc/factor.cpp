// Factor routes (docs/design.md §3): from an accumulator's state to a column order `perm`
// and an engine-ready upper-triangular factor U (k x d, in perm order).
//   cholesky: H_λ = H + λI, U upper with H_λ⁻¹ = UᵀU   (GPTQ as published; computed as
//             U = V⁻¹ with H_λ = VVᵀ, V upper: one Cholesky and one triangular solve, see inverse_factor)
//   svdqr:    A = U_A Σ Vᵀ, optionally σ̃² = σ² + λ (H + λI without forming H), keep k,
//             perm from pivoted QR of Σ_k V_kᵀ,
//             QR of Σ_k⁻¹ V_kᵀ[:, perm] = Q R', U = R' with diag R' > 0   (H⁺ = UᵀU)
//             When λ > 0 and the truncation rule provably keeps all d values (keeps_everything),
//             Σ_d V_dᵀ is a square root of G = H + λI, so the order is the pivoted Cholesky order of
//             G and U is the unique upper factor with G_p⁻¹ = UᵀU: no spectrum is computed.
//   ql:       M lower with H_p = MᵀM from a QR of the column-reversed factor (no inverse;
//             damped as cholesky only if X is rank-deficient);
//             handed to the engine as Ā = 2D⁻¹ − D⁻¹MᵀD⁻¹ (D = diag M), which with
//             errors taken from the original weights is q_j = Q(w_j + Σ_{i<j} M_ji/M_jj (w_i − q_i)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "clones.h"
#include "gram.h"

// LAPACK's Cholesky as libtorch_cpu exports it (how ATen's BatchLinearAlgebra.cpp declares it), weak:
// a torch built without these symbols leaves them null and cholesky_lower takes the ATen op.
extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info) __attribute__((weak));
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info) __attribute__((weak));
}

namespace lrgptq {
namespace {

// (perm, U, rank, dead, damp_lambda, damp_retries, sigma_max, sigma_min_kept, from_original, pivots):
// the named outputs of the schema in ops.cpp.
using FactorOut = std::tuple<at::Tensor, at::Tensor, int64_t, at::Tensor, double, int64_t, double, double, bool,
                             int64_t>;

enum class Source { gram, qr, sketch };

Source parse_source(c10::string_view s) {
  if (s == "gram") return Source::gram;
  if (s == "qr") return Source::qr;
  if (s == "sketch") return Source::sketch;
  TORCH_CHECK(false, "lrgptq.factor: source must be 'gram', 'qr' or 'sketch', got '", s, "'");
}

// RᵀR for an upper-triangular R, a third of the GEMM's flops (gram.h).
at::Tensor upper_gram(const at::Tensor& R) {
  at::Tensor G = at::empty_like(R);
  gram_upper(G, R, /*triangular=*/true, /*beta=*/0.0);
  return G;
}

// H = XᵀX from any accumulator: H itself, or AᵀA for A = R (triangular or not) or Y.
at::Tensor gram_of(const at::Tensor& A, Source src) {
  if (src == Source::gram) return A.clone();
  if (src == Source::qr && at::equal(A, A.triu())) return upper_gram(A);
  return at::matmul(A.t(), A);
}

// diag(H) without forming H.
at::Tensor gram_diag(const at::Tensor& A, Source src) {
  return src == Source::gram ? A.diagonal().clone() : A.square().sum(0);
}

// A factor F with H = FᵀF (F square upper for gram; R or Y as they are).
at::Tensor root_of(const at::Tensor& A, Source src) {
  if (src != Source::gram) return A;
  auto [L, info] = at::linalg_cholesky_ex(A, /*upper=*/true);
  TORCH_CHECK(info.item<int64_t>() == 0,
              "lrgptq.factor: this route needs a factor of H, and H from the 'gram' accumulator is not "
              "positive definite; use the 'qr' accumulator (exact, no Cholesky of H) or route='cholesky'");
  return L;
}

at::Tensor reverse_cols(const at::Tensor& A) { return A.flip({1}); }

// Column j of the pivoted Cholesky factor over rows [i0, i1), from the panel's m earlier columns
// (rows of lp, each n long): L[i, j] = (G[j, i] − Σ_{c<m} L[i, c] L[j, c]) / L[j, j] (G already
// updated for earlier panels), and the residual diagonal rd[i] −= L[i, j]². Vectorised per clone;
// no FMA contraction (-ffp-contract=off), so every clone rounds alike.
LRGPTQ_CLONES void pivot_column(const double* gj, const double* lp, int64_t n, int64_t m, int64_t j, double ljj,
                                double* __restrict lj, double* __restrict rd, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) lj[i] = gj[i];
  for (int64_t c = 0; c < m; ++c) {
    const double* __restrict lc = lp + c * n;
    const double a = lc[j];
    for (int64_t i = i0; i < i1; ++i) lj[i] -= lc[i] * a;
  }
  for (int64_t i = i0; i < i1; ++i) {
    lj[i] /= ljj;
    rd[i] -= lj[i] * lj[i];
  }
}

// The greedy pivot order of pivoted QR of B (columns of largest residual norm first), computed as
// the pivoted Cholesky of G = BᵀB (LAPACK dpstrf's algorithm: panels of nb pivots chosen with
// rank-1 updates of the residual diagonal, trailing matrix updated by GEMMs per panel).
// Same pivots as geqp3 in exact arithmetic; resolves residuals down to tol·max diag(G).
// G is kept as its upper triangle, in position order: a pivot swaps positions j and q
// symmetrically (row j ↔ row q right of q, row j ↔ column q between them, the diagonals), so row j
// is read contiguously and the trailing update G₂₂ −= L₂₁L₂₁ᵀ touches only the upper triangle
// (column blocks, half the flops of the square).
// Returns (perm, number of pivots taken before the residual fell below tol).
// The loop runs on the CPU whatever G's device (cuSOLVER has no pivoted QR): a CUDA G makes a
// round trip of d×d doubles, and perm goes back to G's device. Every other step of the routes is
// an ATen op, so on CUDA it runs on the GPU (cuSOLVER/cuBLAS).
std::tuple<at::Tensor, int64_t> pivoted_order(const at::Tensor& G_in, int64_t kmax, double tol) {
  const c10::Device device = G_in.device();
  // A copy of its own: swapped and updated in place, so the caller's G is never written.
  const at::Tensor G = G_in.to(at::kCPU, at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const int64_t n = G.size(0), nb = 128, cb = 512;
  kmax = std::min(kmax, n);
  double* g = G.data_ptr<double>();
  std::vector<double> rd(n);  // residual diagonal by position
  std::vector<int64_t> p(n);
  for (int64_t i = 0; i < n; ++i) {
    rd[i] = g[i * n + i];
    p[i] = i;
  }
  std::vector<double> panel(static_cast<size_t>(nb) * n);  // L's panel columns, row c = column j0 + c
  double* lp = panel.data();
  const double stop = tol * std::max(*std::max_element(rd.begin(), rd.end()), 0.0);
  int64_t taken = 0;
  for (int64_t j0 = 0; j0 < kmax && taken == j0; j0 += nb) {
    const int64_t jend = std::min(j0 + nb, kmax);
    for (int64_t j = j0; j < jend; ++j) {
      const int64_t q = std::max_element(rd.begin() + j, rd.end()) - rd.begin();  // first of the largest
      if (!(rd[q] > stop)) break;
      if (q != j) {  // swap positions j < q (rows above j are never read again)
        std::swap(rd[j], rd[q]);
        std::swap(p[j], p[q]);
        for (int64_t c = 0; c < j - j0; ++c) std::swap(lp[c * n + j], lp[c * n + q]);
        std::swap(g[j * n + j], g[q * n + q]);
        for (int64_t i = j + 1; i < q; ++i) std::swap(g[j * n + i], g[i * n + q]);
        std::swap_ranges(g + j * n + q + 1, g + j * n + n, g + q * n + q + 1);
      }
      const double ljj = std::sqrt(rd[j]);
      const double* gj = g + j * n;  // row j of the trailing G (upper triangle: columns > j)
      double* lj = lp + (j - j0) * n;
      at::parallel_for(j + 1, n, 512, [&](int64_t i0, int64_t i1) {
        pivot_column(gj, lp, n, j - j0, j, ljj, lj, rd.data(), i0, i1);
      });
      ++taken;
    }
    if (taken == jend && jend < n) {  // upper triangle of G₂₂ − L₂₁L₂₁ᵀ, by column blocks
      const at::Tensor L21 = at::from_blob(lp, {jend - j0, n}, at::kDouble).narrow(1, jend, n - jend);
      for (int64_t b0 = jend; b0 < n; b0 += cb) {
        const int64_t b1 = std::min(b0 + cb, n);
        at::Tensor block = G.narrow(0, jend, b1 - jend).narrow(1, b0, b1 - b0);
        block.addmm_(L21.narrow(1, 0, b1 - jend).t(), L21.narrow(1, b0 - jend, b1 - b0), 1.0, -1.0);
      }
    }
  }
  return {at::from_blob(p.data(), {n}, at::kLong).clone().to(device), taken};
}

at::Tensor order_perm(c10::string_view order, const at::Tensor& diagH, const at::Tensor& G_for_pivot,
                      int64_t kmax, int64_t& pivots) {
  const int64_t d = diagH.size(0);
  pivots = d;
  if (order == "identity") return at::arange(d, diagH.options().dtype(at::kLong));
  if (order == "babai") return at::arange(d - 1, -1, -1, diagH.options().dtype(at::kLong));
  if (order == "act")
    return std::get<1>(at::sort(diagH, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  if (order == "pivot") {
    auto [perm, taken] = pivoted_order(G_for_pivot, kmax, d * std::numeric_limits<double>::epsilon());
    pivots = taken;
    return perm;
  }
  TORCH_CHECK(false, "lrgptq.factor: order must be 'identity', 'act', 'pivot' or 'babai', got '", order, "'");
}

at::Tensor sign_fix_rows(const at::Tensor& R) {
  at::Tensor s = at::where(R.diagonal() < 0, -1.0, 1.0).to(R.scalar_type());
  return R * s.unsqueeze(1);
}

// G[idx][:, idx] for a symmetric G (a symmetric permutation): on the CPU one pass, row r of the
// result is row idx[r] of G read at idx; elsewhere two index_selects.
at::Tensor sym_gather(const at::Tensor& G, const at::Tensor& idx) {
  if (!G.is_cpu()) return G.index_select(0, idx).index_select(1, idx);
  const at::Tensor src = G.contiguous();
  const at::Tensor ix = idx.to(at::kLong).contiguous();
  const int64_t n = ix.size(0), ld = src.size(1);
  at::Tensor out = at::empty({n, n}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "sym_gather", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* k = ix.data_ptr<int64_t>();
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = s + k[r] * ld;
        for (int64_t c = 0; c < n; ++c) o[r * n + c] = row[k[c]];
      }
    });
  });
  return out;
}

// V⁻¹ for an upper-triangular V, by column blocks J = [j0, j1): U[:j1, J] solves
// V[:j1, :j1] X = I[:j1, J], and U is zero below row j1 in J. d³/3 flops (LAPACK trtri's count)
// instead of the d³ of one triangular solve against the whole identity.
at::Tensor upper_inverse(const at::Tensor& V) {
  const int64_t d = V.size(0), nb = 512;
  at::Tensor U = at::zeros_like(V);
  for (int64_t j0 = 0; j0 < d; j0 += nb) {
    const int64_t j1 = std::min(j0 + nb, d);
    at::Tensor rhs = at::zeros({j1, j1 - j0}, V.options());
    rhs.narrow(0, j0, j1 - j0).diagonal().fill_(1);
    U.narrow(0, 0, j1).narrow(1, j0, j1 - j0)
        .copy_(at::linalg_solve_triangular(V.narrow(0, 0, j1).narrow(1, 0, j1), rhs, /*upper=*/true));
  }
  return U;
}

// C lower with Gr = C Cᵀ (the Cholesky factor), undefined when Gr is not numerically positive
// definite; C's strict upper triangle is not zeroed (the callers read C's lower triangle only). On the
// CPU, LAPACK's potrf in place on a copy: Gr is symmetric, so its row-major storage is its
// column-major storage, and the column-major lower factor read row-major is Cᵀ. That skips what
// linalg_cholesky_ex adds around potrf (a column-major copy, zeroing a triangle of that column-major
// result, the info tensor): a quarter of its time at d = 1536.
at::Tensor cholesky_lower(const at::Tensor& Gr) {
  const int64_t n = Gr.size(0);
  const bool dbl = Gr.scalar_type() == at::kDouble;
  if (!Gr.is_cpu() || n > std::numeric_limits<int>::max() || (dbl ? dpotrf_ == nullptr : spotrf_ == nullptr) ||
      !(dbl || Gr.scalar_type() == at::kFloat)) {
    auto [C, info] = at::linalg_cholesky_ex(Gr);
    return info.item<int64_t>() == 0 ? C : at::Tensor();
  }
  at::Tensor A = Gr.clone(at::MemoryFormat::Contiguous);
  const int ni = static_cast<int>(n);
  const char uplo = 'L';
  int info = 0;
  if (dbl)
    dpotrf_(&uplo, &ni, A.data_ptr<double>(), &ni, &info);
  else
    spotrf_(&uplo, &ni, A.data_ptr<float>(), &ni, &info);
  return info == 0 ? A.t() : at::Tensor();
}

// U upper with diag U > 0 and G⁻¹ = UᵀU (unique), from Gr = J G J (J the reversal, so a permuted G
// comes reversed from one gather): Gr = C Cᵀ (Cholesky), V = J C J is upper with G = V Vᵀ, and
// U = V⁻¹, so G⁻¹ = V⁻ᵀV⁻¹ = UᵀU. One Cholesky and one triangular inverse (2/3·d³ flops; GPTQ's
// recipe, Cholesky, inverse from the factor and a second Cholesky, is 4/3·d³). Undefined when G is
// not numerically positive definite (a non-positive pivot, or a non-finite U).
at::Tensor inverse_factor(const at::Tensor& Gr) {
  at::Tensor C = cholesky_lower(Gr);
  if (!C.defined()) return {};
  const at::Tensor V = C.flip({0, 1}).triu_();  // C's unread strict upper triangle lands below: zeroed
  C.reset();
  at::Tensor U = upper_inverse(V);
  if (!std::isfinite(U.sum().item<double>())) return {};  // a NaN or an infinity anywhere reaches the sum
  return U;
}

// Largest eigenvalue of a symmetric positive semi-definite operator: the top Ritz value of `steps`
// Lanczos steps (full reorthogonalisation) from a fixed start, the same on every device. A lower bound
// that is close for any spectrum after a few dozen steps; for reports only.
template <class Apply>
double top_eigenvalue(Apply apply, int64_t d, const at::TensorOptions& opts, int64_t steps = 24) {
  steps = std::min(steps, d);
  at::Tensor Q = at::zeros({steps, d}, opts);
  at::Tensor v = (at::arange(d, opts) * 2.399963).sin().add_(1.5);  // golden-angle start, every entry > 0
  Q[0] = v / v.norm();
  at::Tensor T = at::zeros({steps, steps}, opts.dtype(at::kDouble).device(at::kCPU));
  int64_t m = steps;
  for (int64_t j = 0; j < steps; ++j) {
    at::Tensor w = apply(Q[j]);
    T[j][j] = at::dot(Q[j], w).item<double>();
    const at::Tensor Qj = Q.narrow(0, 0, j + 1);
    w = w - at::mv(Qj.t(), at::mv(Qj, w));  // twice is enough (Kahan)
    w = w - at::mv(Qj.t(), at::mv(Qj, w));
    const double beta = w.norm().item<double>();
    if (j + 1 == steps || !(beta > 1e-12 * std::abs(T[0][0].item<double>())) || !std::isfinite(beta)) {
      m = j + 1;
      break;
    }
    T[j][j + 1] = beta;
    T[j + 1][j] = beta;
    Q[j + 1] = w / beta;
  }
  return at::linalg_eigvalsh(T.narrow(0, 0, m).narrow(1, 0, m)).max().item<double>();
}

double damp_reference(const at::Tensor& diagH, c10::string_view damp_ref) {
  if (damp_ref == "mean") return diagH.mean().item<double>();
  if (damp_ref == "median") return diagH.median().item<double>();
  TORCH_CHECK(false, "lrgptq.factor: damp_ref must be 'mean' or 'median', got '", damp_ref, "'");
}

double unit_roundoff(at::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
}

// GPTQ as published (docs/design.md §3): H_λ = H + λI, U upper with H_λ⁻¹ = UᵀU; on failure λ is
// raised tenfold, and the retries are reported.
FactorOut factor_cholesky(const at::Tensor& A, Source src, c10::string_view order, double damp,
                          c10::string_view damp_ref, int64_t max_retries, at::ScalarType dtype) {
  at::Tensor H = gram_of(A, src).to(dtype);
  const int64_t d = H.size(0);
  at::Tensor dead = H.diagonal() == 0;
  H.diagonal().masked_fill_(dead, 1.0);  // dead features: H_jj = 1 (their W columns are zeroed by the caller)
  int64_t pivots = d;
  const at::Tensor perm = order_perm(order, H.diagonal(), H, d, pivots);
  H = sym_gather(H, perm.flip({0}));  // J H_p J, what inverse_factor takes
  const at::Tensor diag = H.diagonal().clone();
  const double ref = damp_reference(diag, damp_ref);
  double lambda = damp * ref;
  at::Tensor U;
  int64_t retries = 0;
  for (;; ++retries) {
    H.diagonal().copy_(diag + lambda);
    U = inverse_factor(H);
    if (U.defined()) break;
    TORCH_CHECK(retries < max_retries, "lrgptq.factor: Cholesky of H + λI failed ", retries + 1,
                " times (last λ = ", lambda, ", ", lambda / ref,
                " × the ", damp_ref, " diagonal); raise damp or max_retries, or use route='svdqr', which never factors H");
    lambda = lambda > 0 ? 10 * lambda : 1e-8 * ref;
  }
  return {perm, U, d, dead, lambda, retries, 0.0, 0.0, false, pivots};
}

// Number of singular values kept (σ sorted descending).
int64_t truncate(const at::Tensor& sigma, c10::string_view rule, double tau, double unit, int64_t n) {
  const int64_t r = sigma.size(0);
  if (r == 0 || sigma[0].item<double>() <= 0) return 0;
  auto s = sigma.to(at::kDouble);
  const double smax = s[0].item<double>();
  // Numerical rank: σ_i > n·u·σ_1 (what no rule can keep).
  const int64_t numerical = (s > n * unit * smax).sum().item<int64_t>();
  if (rule == "none") return numerical;
  if (rule == "rel") {
    // σ_ref: mean of the leading 10% of the nonzero σ, with the top tenth of those trimmed.
    const int64_t nz = (s > 0).sum().item<int64_t>();
    const int64_t lead = std::max<int64_t>(1, (nz + 9) / 10), trim = lead / 10;
    const double sref = s.narrow(0, trim, lead - trim).mean().item<double>();
    return std::min(numerical, (s > tau * sref).sum().item<int64_t>());
  }
  if (rule == "energy") {
    at::Tensor e = s.square().cumsum(0);
    const double total = e[r - 1].item<double>();
    const int64_t k = (e < (1.0 - tau) * total).sum().item<int64_t>() + 1;
    return std::min(numerical, std::min(k, r));
  }
  TORCH_CHECK(false, "lrgptq.factor: truncation must be 'rel', 'energy' or 'none', got '", rule, "'");
}


// Whether truncation `rule` keeps all d damped singular values σ̃_i = sqrt(σ_i² + λ), decided
// without them (docs/design.md §3, step 1). With λ > 0 every σ̃_i² ≥ λ and Σ_i σ̃_i² = tr H + dλ, so
//   σ̃_1² ≤ tr H + λ, and σ_ref (the mean of the m = lead − trim values `truncate` averages, all d
//   values being nonzero) ≤ sqrt(Σ_block σ̃²/m) ≤ sqrt((tr H + dλ − (d − m)λ)/m) = sqrt(tr H/m + λ);
//   numerical rank (σ̃_i > n·u·σ̃_1) keeps all when λ > (n·u)²(tr H + λ);
//   rel    (σ̃_i > τ·σ_ref)          keeps all when λ > τ²(tr H/m + λ);
//   energy (smallest k with Σ_{i≤k} σ̃_i² ≥ (1 − ε)Σσ̃²) keeps all when σ̃_d² > εΣσ̃², so when λ > ε(tr H + dλ);
//   none keeps the numerical rank. Each bound is asked with a margin of 4 (2 in σ) for the rounding of a
// computed spectrum; a case inside the margin computes the spectrum.
bool keeps_everything(c10::string_view rule, double tau, double unit, int64_t n, int64_t d, double lambda,
                      double trace) {
  constexpr double margin = 4;
  const double nu = n * unit;
  if (!(lambda > 0) || !(lambda > margin * nu * nu * (trace + lambda))) return false;
  if (rule == "none") return true;
  if (rule == "rel") {
    const int64_t lead = std::max<int64_t>(1, (d + 9) / 10), m = lead - lead / 10;
    return lambda > margin * tau * tau * (trace / m + lambda);
  }
  if (rule == "energy") return lambda > margin * tau * (trace + d * lambda);
  return false;  // an unknown rule goes on to truncate(), which names it
}

// svdqr when nothing is truncated: Σ_d V_dᵀ is then a square root of G = H + λI, so its pivoted-QR
// order is the pivoted Cholesky order of G, and QR of Σ_d⁻¹V_dᵀ[:, perm] = Q R' gives the unique upper
// R' = U with diag > 0 and UᵀU = G_p⁻¹: inverse_factor(G_p), no spectrum. σ̃_1 and σ̃_d are estimated
// for the report. Empty when G is numerically singular (the pivots stop early, or its Cholesky fails).
std::optional<FactorOut> factor_svdqr_full(const at::Tensor& A, Source src, c10::string_view order, double lambda,
                                           at::ScalarType dtype, const at::Tensor& diagH, const at::Tensor& dead) {
  const int64_t d = A.size(1);
  at::Tensor G = gram_of(A.to(dtype), src);
  G.diagonal().add_(lambda);
  int64_t pivots = d;
  at::Tensor perm;
  if (order == "pivot") {
    auto [piv, taken] = pivoted_order(G, d, d * std::numeric_limits<double>::epsilon());
    if (taken < d) return std::nullopt;
    perm = piv;
  } else {
    perm = order_perm(order, diagH, at::Tensor(), d, pivots);
  }
  at::Tensor U = inverse_factor(sym_gather(G, perm.flip({0})));
  if (!U.defined()) return std::nullopt;
  // The report's σ̃_1² = λ_max(G) and 1/σ̃_d² = λ_max(UᵀU): estimates, so in float32 (half the reads).
  const at::Tensor Gf = G.to(at::kFloat), Uf = U.to(at::kFloat);
  G.reset();
  const double smax2 = top_eigenvalue([&](const at::Tensor& v) { return at::mv(Gf, v); }, d, Gf.options());
  const double sinv2 =
      top_eigenvalue([&](const at::Tensor& v) { return at::mv(Uf.t(), at::mv(Uf, v)); }, d, Uf.options());
  return FactorOut{perm, U, d, dead, lambda, 0, std::sqrt(smax2), 1.0 / std::sqrt(sinv2), false, pivots};
}

// svdqr from the spectrum (docs/design.md §3, steps 1-3): SVD of R or Y, eigh of H.
FactorOut factor_svdqr_spectrum(const at::Tensor& A, Source src, c10::string_view order, double lambda,
                                c10::string_view truncation, double tau, at::ScalarType dtype,
                                const at::Tensor& diagH, const at::Tensor& dead) {
  const int64_t d = A.size(1);
  at::Tensor sigma, Vh;
  if (src == Source::gram) {  // H = VΛVᵀ, σ = sqrt(λ)
    auto [evals, V] = at::linalg_eigh(A.to(dtype));
    sigma = evals.flip({0}).clamp_min(0).sqrt();
    Vh = V.flip({1}).t();
  } else {  // damping needs every right singular vector, also those of σ = 0 when A has < d rows
    auto [Us, S, V] = at::linalg_svd(A.to(dtype), /*full_matrices=*/lambda > 0 && A.size(0) < d);
    sigma = S.size(0) < V.size(0) ? at::cat({S, at::zeros({V.size(0) - S.size(0)}, S.options())}) : S;
    Vh = V;
  }
  if (lambda > 0) sigma = (sigma.square() + lambda).sqrt();  // σ̃² = σ² + λ: the factor of H + λI, H never formed
  int64_t k = truncate(sigma, truncation, tau, unit_roundoff(dtype), std::max(A.size(0), d));
  at::Tensor B = sigma.narrow(0, 0, k).unsqueeze(1) * Vh.narrow(0, 0, k);  // Σ_k V_kᵀ
  at::Tensor perm;
  int64_t pivots = d;
  if (order == "pivot" || k < d) {
    // The first k pivots of B are the columns that carry the kept subspace. For other orders the
    // kept columns go first in that order and the columns past rank after them (docs/design.md §3.4).
    const at::Tensor B64 = B.to(at::kDouble);  // the Gram squares κ: form it in float64 whatever the dtype
    auto [piv, taken] = pivoted_order(at::matmul(B64.t(), B64), k, d * std::numeric_limits<double>::epsilon());
    pivots = taken;
    k = std::min(k, taken);
    if (order == "pivot") {
      perm = piv;
    } else {
      int64_t unused = 0;
      at::Tensor pref = order_perm(order, diagH, at::Tensor(), d, unused);
      at::Tensor rank_of = at::empty_like(pref);
      rank_of.index_put_({pref}, at::arange(d, pref.options()));
      at::Tensor kept = piv.narrow(0, 0, k), rest = piv.narrow(0, k, d - k);
      kept = kept.index_select(0, std::get<1>(at::sort(rank_of.index_select(0, kept))));
      rest = rest.index_select(0, std::get<1>(at::sort(rank_of.index_select(0, rest))));
      perm = at::cat({kept, rest});
    }
  } else {
    perm = order_perm(order, diagH, at::Tensor(), d, pivots);
  }
  at::Tensor C = (Vh.narrow(0, 0, k) / sigma.narrow(0, 0, k).unsqueeze(1)).index_select(1, perm);
  at::Tensor U = k > 0 ? sign_fix_rows(std::get<1>(at::linalg_qr(C, "r"))) : C;
  const double smax = k > 0 ? sigma[0].item<double>() : 0.0, smin = k > 0 ? sigma[k - 1].item<double>() : 0.0;
  return {perm, U, k, dead, lambda, 0, smax, smin, false, pivots};
}

// This project's route: never forms or damps H when the state is R or Y and truncation needs the
// spectrum; when truncation provably keeps everything (λ > 0, keeps_everything) it takes
// factor_svdqr_full, which forms G = H + λI (κ(G) ≤ 1 + σ_1²/λ) and computes no spectrum.
// force_spectrum: always the spectrum (the route as it was before the full-rank path; for tests).
FactorOut factor_svdqr(const at::Tensor& A, Source src, c10::string_view order, double damp,
                       c10::string_view damp_ref, c10::string_view truncation, double tau, at::ScalarType dtype,
                       bool force_spectrum) {
  const int64_t d = A.size(1);
  const at::Tensor diagH = gram_diag(A, src).to(dtype);
  const at::Tensor dead = diagH == 0;
  const double lambda = damp > 0 ? damp * damp_reference(diagH, damp_ref) : 0.0;
  if (!force_spectrum && keeps_everything(truncation, tau, unit_roundoff(dtype), std::max(A.size(0), d), d, lambda,
                                          diagH.sum().item<double>())) {
    if (auto out = factor_svdqr_full(A, src, order, lambda, dtype, diagH, dead)) return *std::move(out);
  }
  return factor_svdqr_spectrum(A, src, order, lambda, truncation, tau, dtype, diagH, dead);
}

// Exact route without an inverse: M lower with H_p = MᵀM. When X is rank-deficient (a zero
// pivot in M), H is damped as the cholesky route does, F ← R-factor of [F; √λ I], and reported.
FactorOut factor_ql(const at::Tensor& A, Source src, c10::string_view order, double damp,
                    c10::string_view damp_ref, int64_t max_retries, at::ScalarType dtype) {
  const int64_t d = A.size(1);
  at::Tensor F = root_of(A.to(dtype), src);  // H = FᵀF
  at::Tensor diagH = gram_diag(A, src).to(dtype);
  at::Tensor dead = diagH == 0;
  int64_t pivots = d;
  at::Tensor perm = order_perm(order, diagH, order == "pivot" ? at::matmul(F.t(), F) : at::Tensor(), d, pivots);
  const at::Tensor Fp = F.index_select(1, perm);
  const double unit = unit_roundoff(dtype);
  const double ref = damp_reference(diagH, damp_ref);
  double lambda = 0;
  int64_t retries = 0;
  at::Tensor M;
  for (;; ++retries) {
    at::Tensor Fl = lambda > 0 ? at::cat({Fp, std::sqrt(lambda) * at::eye(d, Fp.options())}) : Fp;
    // QR of F_p reversed: F_p J = Q R̃, so H_p = J R̃ᵀR̃ J = MᵀM with M = J R̃ J lower.
    at::Tensor Rt = sign_fix_rows(std::get<1>(at::linalg_qr(reverse_cols(Fl), "r")));
    if (Rt.size(0) >= d) {
      M = Rt.flip({0, 1});
      const at::Tensor D = M.diagonal();
      if ((D > d * unit * D.abs().max()).all().item<bool>()) break;
    }
    TORCH_CHECK(retries < max_retries, "lrgptq.factor: route='ql' met rank-deficient inputs and damping up to λ = ",
                lambda, " did not cure it; use route='svdqr', which truncates instead of damping");
    lambda = lambda > 0 ? 10 * lambda : (damp > 0 ? damp : 1e-8) * ref;
  }
  at::Tensor Dinv = M.diagonal().reciprocal();
  at::Tensor U = Dinv.diag() * 2 - Dinv.unsqueeze(1) * M.t() * Dinv.unsqueeze(0);  // Ā = 2D⁻¹ − D⁻¹MᵀD⁻¹
  return {perm, U.triu(), d, dead, lambda, retries, 0.0, 0.0, /*from_original=*/true, pivots};
}

FactorOut factor(const at::Tensor& A, c10::string_view source, c10::string_view route,
                 c10::string_view order, double damp, c10::string_view damp_ref, int64_t max_retries,
                 c10::string_view truncation, double tau, at::ScalarType dtype, bool force_spectrum) {
  const Source src = parse_source(source);
  TORCH_CHECK(A.dim() == 2 && A.size(1) > 0, "lrgptq.factor: A must be a 2-D accumulator state, got ", A.sizes());
  TORCH_CHECK(src == Source::sketch || A.size(0) == A.size(1),
              "lrgptq.factor: a '", source, "' state must be square, got ", A.sizes());
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat, "lrgptq.factor: dtype must be float64 or float32, got ", dtype);
  check_float(A, "factor", "A");
  check_finite(A, "factor", "the accumulator state A");
  TORCH_CHECK(damp >= 0 && std::isfinite(damp), "lrgptq.factor: damp must be finite and >= 0, got ", damp);
  TORCH_CHECK(tau >= 0 && std::isfinite(tau), "lrgptq.factor: tau must be finite and >= 0, got ", tau);
  if (route == "cholesky") return factor_cholesky(A, src, order, damp, damp_ref, max_retries, dtype);
  if (route == "svdqr") return factor_svdqr(A, src, order, damp, damp_ref, truncation, tau, dtype, force_spectrum);
  if (route == "ql") return factor_ql(A, src, order, damp, damp_ref, max_retries, dtype);
  TORCH_CHECK(false, "lrgptq.factor: route must be 'cholesky', 'svdqr' or 'ql', got '", route, "'");
}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) { m.impl("factor", &factor); }
#ifdef LRGPTQ_WITH_CUDA
// The same function: ATen ops on the GPU, the pivot loop on the CPU (pivoted_order).
TORCH_LIBRARY_IMPL(lrgptq, CUDA, m) { m.impl("factor", &factor); }
#endif

}  // namespace lrgptq
