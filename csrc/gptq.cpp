// The GPTQ engine (docs/design.md §4) on the uniform grid: the scalar step and the block-LDLQ step,
// each a function that plugs into the one block loop of csrc/engine_common.h. In perm order, with targets T (initially W[:, perm]):
//   q_j = quant(T_j);  e_j = (base_j − Q_j)/U_jj  (base = T_j, or the original w_j for the ql form)
//   T_l −= e_j · U_jl  for l > j inside the block;   T[:, i2:] −= E_block · U[i1:i2, i2:] (one GEMM)
//   loss += (T_j − Q_j)² / U_jj².   Columns j >= k (past rank) are rounded with no feedback.
// Group parameters come from the fully updated targets of the group's columns: blocks are cut at
// every group start whose group would straddle the block end, so Q does not depend on the block size.
// Block LDLQ (ldlq_dim D > 1; docs/design.md §5): columns J = [j0, j0 + D) are chosen jointly.
// With z = U⁻ᵀ(w − q) the loss is Σ z_j², and z_J = U_JJ⁻ᵀ (t_J − q_J) with t_J the targets updated by the columns before J,
// so q_J = argmin over the grid of ‖U_JJ⁻ᵀ (t_J − q)‖² (a D-dim closest-point search, below);
// e_J = z_J feeds forward exactly as the scalar errors do. D = 1 is scalar GPTQ.
// Clipping: a target t_j whose rounded code falls outside 0..maxq (and is clamped) is counted per row.
// grid "noclip": pass 1 as "minmax", recording each (group, row)'s range of targets; each later pass
// fixes the smallest grids with |t − q| ≤ δ/2 on the union of the ranges seen so far (widened where
// still clipped), and reruns, until a pass clips nothing (or grid_passes ran): the condition of Babai's
// bound (docs/design.md §6.5).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "clones.h"
#include "cuda_ops.h"
#include "engine_common.h"
#include "gptq_blocks.h"
#include "mse_search.h"
#include "quantizer.h"

namespace lrgptq {
namespace {

using EngineOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int kMaxLdlq = 8;       // largest block LDLQ dimension D
constexpr int64_t kMaxNodes = 1 << 16;  // search nodes per (row, D-block); the best found is kept

template <typename T>
struct Problem {
  int64_t d_out, d, k, gsz, D;
  bool from_original, sym, mse, static_groups;
  bool fixed;         // grids given (static groups, or a noclip pass): none computed at group starts
  T maxq;
  T* Tw;              // targets, (d_out, d) row-major, perm order
  const T* W;         // the original weights (d_out, d), original order (read by the ql form)
  const T* U;         // (k, d) row-major, perm order
  const int64_t* perm;
  const int64_t* col_group;  // (d) the group of column j (perm order): static ? perm[j] / gsz : j / gsz
  T* scales;          // (G, d_out)
  T* zeros;           // (G, d_out)
  uint8_t* codes;     // (d_out, d), perm order (unpermute_rows after the last pass)
  T* Q;               // (d_out, d), perm order
  T* E;               // (d_out, B) scaled errors of the current block
  int64_t ldE;
  T* row_loss;        // (d_out)
  int64_t* clipped;   // (d_out) targets whose code was clamped
  T* tmin;            // (G, d_out) range of the targets seen per group and row, or nullptr
  T* tmax;

  Grid<T> grid(int64_t j, int64_t r) const {
    const int64_t i = col_group[j] * d_out + r;
    return {scales[i], zeros[i]};
  }
  // Group params at a group start from the fully updated targets of the group's columns
  // (target(i): column j + i of row r). Without fixed grids col_group[j] = j / gsz, so j starts its
  // group when col_group[j]·gsz = j (no division).
  template <typename At>
  void start_group(const At& target, int64_t j, int64_t r) const {
    if (fixed || col_group[j] * gsz != j) return;
    const int64_t n = std::min(gsz, d - j);
    const Grid<T> g = mse ? searched_grid(target, n) : find_grid_fn<T>(target, n, maxq, sym, false);
    scales[col_group[j] * d_out + r] = g.scale;
    zeros[col_group[j] * d_out + r] = g.zero;
  }
  // The MSE search's grid, on the group's targets gathered contiguously; kept out of line, off the
  // engine's hot loop.
  template <typename At>
  __attribute__((noinline)) Grid<T> searched_grid(const At& target, int64_t n) const {
    thread_local std::vector<T> x;
    x.resize(n);
    for (int64_t i = 0; i < n; ++i) x[i] = target(i);
    return mse_grid(x.data(), n, maxq, sym);
  }
  // Bookkeeping of target t_j of row r with its unclamped code c: clipping count and the range seen.
  void note_target(T x, T c, int64_t j, int64_t r) const {
    if (c < 0 || c > maxq) ++clipped[r];
    if (tmin != nullptr) {
      const int64_t i = col_group[j] * d_out + r;
      tmin[i] = std::min(tmin[i], x);
      tmax[i] = std::max(tmax[i], x);
    }
  }
  // Column j's code and value for row r.
  T put(T c, const Grid<T>& g, int64_t j, int64_t r) const {
    const T q = clamp_code(c, maxq);
    const T value = dequant(q, g);
    codes[r * d + j] = static_cast<uint8_t>(q);
    Q[r * d + j] = value;
    return value;
  }
};

// The scalar step (docs/design.md §4): rows [r0, r1) (at most kEngineRowTile) through the block
// columns [i1, i2), one column at a time: the sequential hot loop. Each row's arithmetic is its own
// and in column order, as written; the tile's rows go through each column together, so that the
// quantizer runs on a vector of rows (one vector divide for the tile) and one row's chain of
// latencies overlaps the others'.
// The tile's block segment lives in a packed buffer (row stride w = i2 − i1, not d): with a
// power-of-two d the rows of T, Q and the codes would share one L1 set. Its columns are not
// written back (nothing reads them after the block); Q and the codes go out row by row at the end.
template <typename T>
LRGPTQ_INLINE void scalar_step_body(const Problem<T>& P, int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
  const int64_t d = P.d, n = r1 - r0, w = i2 - i1;
  thread_local std::vector<T> buf;
  thread_local std::vector<uint8_t> code_buf;
  buf.resize(2 * n * w);
  code_buf.resize(n * w);
  T* tile = buf.data();       // tile[a·w + c] = T[r0 + a, i1 + c]
  T* tile_q = tile + n * w;   // Q of the same entries
  uint8_t* tile_codes = code_buf.data();
  for (int64_t a = 0; a < n; ++a) std::copy(P.Tw + (r0 + a) * d + i1, P.Tw + (r0 + a) * d + i2, tile + a * w);
  T loss[kEngineRowTile] = {}, x[kEngineRowTile], base[kEngineRowTile], c[kEngineRowTile];
  T value[kEngineRowTile], err[kEngineRowTile], scale[kEngineRowTile], zero[kEngineRowTile];
  for (int64_t j = i1; j < i2; ++j) {
    const T* u = P.U + j * d;
    const int64_t pj = P.perm[j], gi = P.col_group[j] * P.d_out + r0, cj = j - i1;
    for (int64_t a = 0; a < n; ++a) {
      const T* t = tile + a * w;
      const T* row = P.Tw + (r0 + a) * d;  // columns past the block (a group starting at i1)
      P.start_group([&](int64_t i) { return j + i < i2 ? t[cj + i] : row[j + i]; }, j, r0 + a);
      x[a] = t[cj];
      base[a] = P.from_original ? P.W[(r0 + a) * d + pj] : x[a];
    }
    for (int64_t a = 0; a < n; ++a) {  // vectorised over the rows
      scale[a] = P.scales[gi + a];
      zero[a] = P.zeros[gi + a];
      c[a] = raw_code(x[a], Grid<T>{scale[a], zero[a]});
      value[a] = dequant(clamp_code(c[a], P.maxq), Grid<T>{scale[a], zero[a]});
    }
    if (j < P.k) {
      const T ujj = u[j];
      for (int64_t a = 0; a < n; ++a) {  // vectorised over the rows
        err[a] = (base[a] - value[a]) / ujj;
        const T res = (x[a] - value[a]) / ujj;
        loss[a] += res * res;
      }
    } else {
      std::fill(err, err + n, T(0));  // past rank: rounded, no feedback
    }
    for (int64_t a = 0; a < n; ++a) {
      const int64_t r = r0 + a;
      P.note_target(x[a], c[a], j, r);
      tile_codes[a * w + cj] = static_cast<uint8_t>(clamp_code(c[a], P.maxq));
      tile_q[a * w + cj] = value[a];
      P.E[r * P.ldE + cj] = err[a];
      if (j >= P.k) continue;
      T* t = tile + a * w - i1;  // t[l]: column l
      const T ea = err[a];
      for (int64_t l = j + 1; l < i2; ++l) t[l] -= ea * u[l];  // vectorised: one rounding each, as written
    }
  }
  for (int64_t a = 0; a < n; ++a) {
    const int64_t r = r0 + a;
    P.row_loss[r] += loss[a];
    std::copy(tile_codes + a * w, tile_codes + (a + 1) * w, P.codes + r * d + i1);
    std::copy(tile_q + a * w, tile_q + (a + 1) * w, P.Q + r * d + i1);
  }
}
// Built for AVX-512 and AVX2 too (csrc/clones.h; the body inlined into each clone);
// -ffp-contract=off keeps every product and difference separately rounded in each, so all builds
// give the same bits.
LRGPTQ_CLONES void scalar_step(const Problem<float>& P, int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
  scalar_step_body(P, i1, i2, r0, r1);
}
LRGPTQ_CLONES void scalar_step(const Problem<double>& P, int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
  scalar_step_body(P, i1, i2, r0, r1);
}

// Block LDLQ's choice for one row and one D-block J: the grid point q_J minimising
// ‖U_JJ⁻ᵀ (t_J − q)‖² = Σ_a z_a², z_a = (c_a − q_a)/U_aa, c_a = t_a − Σ_{i<a} U_ia z_i.
// Depth-first (Schnorr–Euchner): at level a, codes nearest c_a first, alternating sides; a side is
// dropped once its cost reaches the best leaf. The first leaf is the sequential (scalar GPTQ)
// choice, and only a strictly better leaf replaces it, so the block never does worse than scalar
// GPTQ on its own quadratic. At most kMaxNodes nodes per search; the best leaf found is kept.
template <typename T>
struct BlockSearch {
  int n;
  const T* t;    // t_J
  const T* U;    // U_JJ: U_ab at U[a * ld + b]
  int64_t ld;
  const Grid<T>* g;
  T maxq;
  T z[kMaxLdlq];
  int code[kMaxLdlq];
  int best_code[kMaxLdlq];
  T best = std::numeric_limits<T>::infinity();
  int64_t nodes = 0;

  T centre(int a) const {
    T c = t[a];
    for (int i = 0; i < a; ++i) c -= z[i] * U[i * ld + a];  // the scalar loop's order of updates
    return c;
  }

  bool visit(int a, T c, int q, T partial) {
    const T za = (c - dequant(T(q), g[a])) / U[a * ld + a];
    const T p = partial + za * za;
    if (!(p < best) || nodes >= kMaxNodes) return false;
    ++nodes;
    z[a] = za;
    code[a] = q;
    if (a + 1 == n) {
      best = p;
      std::copy(code, code + n, best_code);
    } else {
      descend(a + 1, p);
    }
    return true;
  }

  void descend(int a, T partial) {
    const T c = centre(a);
    const int top = static_cast<int>(maxq);
    const int c0 = static_cast<int>(quant_code(c, g[a], maxq));
    if (!visit(a, c, c0, partial)) return;
    auto dist = [&](int q) { return std::abs(c - dequant(T(q), g[a])); };
    int lo = c0 - 1, hi = c0 + 1;
    while (lo >= 0 || hi <= top) {
      if (hi <= top && (lo < 0 || dist(hi) < dist(lo))) {
        hi = visit(a, c, hi, partial) ? hi + 1 : top + 1;
      } else {
        lo = visit(a, c, lo, partial) ? lo - 1 : -1;
      }
    }
  }
};

// The block-LDLQ step (docs/design.md §5): rows [r0, r1) through the block columns [i1, i2),
// D columns at a time.
template <typename T>
void ldlq_step(const Problem<T>& P, int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
  const int64_t d = P.d;
  Grid<T> g[kMaxLdlq];
  for (int64_t r = r0; r < r1; ++r) {
    T* t = P.Tw + r * d;
    T* e = P.E + r * P.ldE;
    T loss = 0;
    for (int64_t j0 = i1; j0 < i2; j0 += P.D) {
      const int64_t j1 = std::min(j0 + P.D, i2);
      P.start_group([&](int64_t i) { return t[j0 + i]; }, j0, r);  // D divides the group size
      const int n = static_cast<int>(std::max<int64_t>(0, std::min(j1, P.k) - j0));
      for (int a = 0; a < j1 - j0; ++a) g[a] = P.grid(j0 + a, r);
      BlockSearch<T> S{n, t + j0, P.U + j0 * d + j0, d, g, P.maxq};
      if (n > 0) S.descend(0, 0);
      for (int a = 0; a < n; ++a) {  // z_J of the chosen codes, as the scalar loop would compute it
        const T c = S.centre(a);
        const T Q = P.put(T(S.best_code[a]), g[a], j0 + a, r);
        S.z[a] = (c - Q) / P.U[(j0 + a) * d + j0 + a];
        P.note_target(c, raw_code(c, g[a]), j0 + a, r);
        e[j0 + a - i1] = S.z[a];
        loss += S.z[a] * S.z[a];
      }
      for (int64_t j = j0 + n; j < j1; ++j) {  // past rank k: rounded, no feedback
        const T c = raw_code(t[j], g[j - j0]);
        P.note_target(t[j], c, j, r);
        P.put(c, g[j - j0], j, r);
        e[j - i1] = 0;
      }
      for (int a = 0; a < n; ++a) {  // T_l −= z_a U_al for the block's later columns
        const T* u = P.U + (j0 + a) * d;
        for (int64_t l = j1; l < i2; ++l) t[l] -= S.z[a] * u[l];
      }
    }
    P.row_loss[r] += loss;
  }
}

// One pass of the engine over every column: the block loop with the scalar or the block-LDLQ step.
template <typename T>
void run_pass(const Problem<T>& P, at::Tensor& Tw, const at::Tensor& U, const at::Tensor& E, int64_t B) {
  const auto end = [&](int64_t i1) { return block_end(i1, B, P.d, P.gsz, P.fixed); };
  const auto none = [](int64_t, int64_t) {};
  if (P.D == 1)
    block_loop(Tw, E, U, P.k, end, none, [&](int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
      scalar_step(P, i1, i2, r0, r1);
    });
  else
    block_loop(Tw, E, U, P.k, end, none, [&](int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
      ldlq_step(P, i1, i2, r0, r1);
    });
}

// Grids of a noclip pass: per (group, row), the covering grid of the targets' range seen so far.
// From the third pass on, a side of a range that still grew in the last pass (those clipped) is
// pushed out by a further kWiden of the range, so that the passes end (geometric growth).
constexpr double kWiden = 0.125;

template <typename T>
void covering_grids(const Problem<T>& P, int64_t G, const T* prev_min, const T* prev_max, bool widen) {
  at::parallel_for(0, G * P.d_out, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (widen) {
        const T span = P.tmax[i] - P.tmin[i];
        if (P.tmin[i] < prev_min[i]) P.tmin[i] -= T(kWiden) * span;
        if (P.tmax[i] > prev_max[i]) P.tmax[i] += T(kWiden) * span;
      }
      const Grid<T> g = covering_grid(P.tmin[i], P.tmax[i], P.maxq, P.sym);
      P.scales[i] = g.scale;
      P.zeros[i] = g.zero;
    }
  });
}

// Static groups: params of group g from the original W[:, g·gsz : (g+1)·gsz] before any update.
template <typename T>
void static_grids(const Problem<T>& P, const at::Tensor& W) {
  const int64_t G = (P.d + P.gsz - 1) / P.gsz;
  const T* w = W.data_ptr<T>();
  at::parallel_for(0, P.d_out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const T* x = w + r * P.d + g * P.gsz;
        const int64_t n = std::min(P.gsz, P.d - g * P.gsz);
        const Grid<T> grid = P.mse ? mse_grid(x, n, P.maxq, P.sym)
                                   : find_grid_fn<T>([x](int64_t i) { return x[i]; }, n, P.maxq, P.sym, false);
        P.scales[g * P.d_out + r] = grid.scale;
        P.zeros[g * P.d_out + r] = grid.zero;
      }
  });
}

enum class GridKind { minmax, noclip };

GridKind parse_grid(c10::string_view grid) {
  if (grid == "minmax") return GridKind::minmax;
  if (grid == "noclip") return GridKind::noclip;
  TORCH_CHECK(false, "lrgptq.gptq_quantize: grid must be 'minmax' or 'noclip', got '", grid, "'");
}

// The uniform grid's own settings (W, perm and U: check_engine_inputs).
void check_settings(int64_t bits, int64_t group_size, int64_t block_size, bool from_original, bool mse,
                    bool static_groups, int64_t ldlq_dim, GridKind grid, int64_t grid_passes) {
  constexpr const char* op = "lrgptq.gptq_quantize";
  TORCH_CHECK(bits >= 2 && bits <= 8, op, ": bits must be in 2..8, got ", bits);
  TORCH_CHECK(group_size == -1 || group_size > 0, op,
              ": group_size must be -1 (one group per row) or positive, got ", group_size);
  TORCH_CHECK(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK(ldlq_dim >= 1 && ldlq_dim <= kMaxLdlq, op, ": ldlq_dim (block LDLQ's D) must be in 1..", kMaxLdlq,
              ", got ", ldlq_dim);
  TORCH_CHECK(ldlq_dim == 1 || !from_original, op,
              ": block LDLQ (ldlq_dim > 1) needs the factor U with H⁻¹ = UᵀU; the 'ql' route hands the engine "
              "its ql form (from_original): use route 'cholesky' or 'svdqr'");
  TORCH_CHECK(ldlq_dim == 1 || static_groups || group_size == -1 || group_size % ldlq_dim == 0, op,
              ": with groups set from the updated weights, group_size (", group_size,
              ") must be a multiple of ldlq_dim (", ldlq_dim, ") so that no D-block straddles a group start; "
              "change one of them or use static_groups");
  TORCH_CHECK(grid == GridKind::minmax || !mse, op,
              ": grid 'noclip' sets its own range; mse=True (a shrunk range) conflicts");
  TORCH_CHECK(grid_passes >= 1, op, ": grid_passes must be >= 1, got ", grid_passes);
}

// The op: scalar GPTQ (ldlq_dim 1) or block LDLQ on the min-max/MSE grid or the noclip grid.
EngineOut gptq_quantize(const at::Tensor& W, const at::Tensor& perm, const at::Tensor& U_in, bool from_original,
                        int64_t bits, int64_t group_size, bool sym, bool mse, bool static_groups, int64_t block_size,
                        int64_t ldlq_dim, c10::string_view grid_name, int64_t grid_passes) {
  check_engine_inputs("gptq_quantize", W, perm, U_in);
  const GridKind grid = parse_grid(grid_name);
  check_settings(bits, group_size, block_size, from_original, mse, static_groups, ldlq_dim, grid, grid_passes);
  const int64_t d_out = W.size(0), d = W.size(1);
  const int64_t gsz = group_size == -1 ? std::max<int64_t>(d, 1) : group_size;
  const int64_t G = (d + gsz - 1) / gsz;  // the last group is shorter when gsz does not divide d
  const auto opts = W.options();
  at::Tensor Wc = W.contiguous();
  at::Tensor perm_c = perm.contiguous();
  const bool identity = at::equal(perm_c, at::arange(d, perm.options()));
  at::Tensor U = U_in.to(W.scalar_type()).contiguous();
  at::Tensor Tw = at::empty_like(Wc);
  at::Tensor scales = at::zeros({G, d_out}, opts), zeros = at::zeros({G, d_out}, opts);
  at::Tensor codes = at::empty({d_out, d}, opts.dtype(at::kByte));
  at::Tensor Q = at::empty({d_out, d}, opts);
  // Blocks of B columns hold whole D-blocks.
  const int64_t B0 = std::min(block_size, std::max<int64_t>(d, 1));
  const int64_t B = std::max(ldlq_dim, B0 - B0 % ldlq_dim);
  at::Tensor row_loss = at::zeros({d_out}, opts);
  at::Tensor row_clipped = at::zeros({d_out}, opts.dtype(at::kLong));
  at::Tensor tmin, tmax;  // ranges of targets, kept across noclip passes
  if (grid == GridKind::noclip) {
    tmin = at::zeros({G, d_out}, opts);
    tmax = at::zeros({G, d_out}, opts);
  }
  int64_t passes = 0;

  if (W.is_cuda()) {
#ifdef LRGPTQ_WITH_CUDA
    TORCH_CHECK(ldlq_dim == 1 && grid == GridKind::minmax,
                "lrgptq.gptq_quantize: block LDLQ (ldlq_dim > 1) and grid 'noclip' run on the CPU only; "
                "move W, perm and U to the CPU (.cpu()) or use ldlq_dim=1, grid='minmax' on CUDA");
    check_finite(W, "gptq_quantize", "W");
    // The kernel works in perm order throughout: targets, W0, codes and Q; mapped back after.
    at::Tensor Wp = identity ? Wc : Wc.index_select(1, perm_c).contiguous();
    Tw.copy_(Wp);
    at::Tensor codes_p = identity ? codes : at::empty_like(codes), Q_p = identity ? Q : at::empty_like(Q);
    gptq_engine_cuda({Tw, from_original ? Wp : at::Tensor(), Wc, U, perm_c, scales, zeros, codes_p, Q_p, row_loss,
                      row_clipped},
                     {gsz, bits, B, from_original, sym, mse, static_groups});
    if (!identity) {
      codes.index_copy_(1, perm_c, codes_p);
      Q.index_copy_(1, perm_c, Q_p);
    }
    passes = 1;
#else
    TORCH_CHECK(false, "lrgptq.gptq_quantize: this build has no CUDA kernels; rebuild with a CUDA torch");
#endif
  } else {
    at::Tensor E = at::zeros({d_out, B}, opts);
    // The group of each column in perm order (static groups: its original column's group).
    at::Tensor col_group = (static_groups ? perm_c : at::arange(d, perm.options())).div(gsz, "floor");
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "gptq_quantize", [&] {
      const scalar_t* w = Wc.data_ptr<scalar_t>();
      const int64_t* pm = perm_c.data_ptr<int64_t>();
      Problem<scalar_t> P{d_out, d, U.size(0), gsz, ldlq_dim, from_original, sym, mse, static_groups, static_groups,
                          static_cast<scalar_t>((1 << bits) - 1), Tw.data_ptr<scalar_t>(), w, U.data_ptr<scalar_t>(),
                          pm, col_group.data_ptr<int64_t>(), scales.data_ptr<scalar_t>(), zeros.data_ptr<scalar_t>(),
                          codes.data_ptr<uint8_t>(), Q.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(), B,
                          row_loss.data_ptr<scalar_t>(), row_clipped.data_ptr<int64_t>(),
                          tmin.defined() ? tmin.data_ptr<scalar_t>() : nullptr,
                          tmax.defined() ? tmax.data_ptr<scalar_t>() : nullptr};
      at::Tensor prev_min, prev_max;  // ranges before the last pass
      while (true) {
        if (tmin.defined()) {
          prev_min = tmin.clone();
          prev_max = tmax.clone();
        }
        // The first pass over W: the targets in perm order, and W's check (before any grid is set).
        const bool finite = gather_targets(w, pm, identity, d_out, d, P.Tw);
        if (passes == 0) {
          check_finite_found(finite, "gptq_quantize", "W");
          if (static_groups) static_grids(P, Wc);
        }
        row_loss.zero_();
        row_clipped.zero_();
        run_pass(P, Tw, U, E, B);
        ++passes;
        if (grid == GridKind::minmax || passes >= grid_passes || row_clipped.sum().item<int64_t>() == 0) break;
        // next pass: the smallest grids that cover every target seen so far
        covering_grids(P, G, prev_min.data_ptr<scalar_t>(), prev_max.data_ptr<scalar_t>(), passes >= 2);
        P.fixed = true;
      }
      if (!identity) {
        unpermute_rows(codes.data_ptr<uint8_t>(), pm, d_out, d);
        unpermute_rows(Q.data_ptr<scalar_t>(), pm, d_out, d);
      }
    });
  }

  at::Tensor g_idx;
  if (static_groups || identity) {
    g_idx = at::arange(d, opts.dtype(at::kInt)).div_(gsz, "floor");
  } else {  // act-order: group j // gsz assigned in perm order, mapped back
    g_idx = at::empty({d}, opts.dtype(at::kInt))
                .index_copy_(0, perm_c, at::arange(d, opts.dtype(at::kInt)).div_(gsz, "floor"));
  }
  return {codes, scales, zeros, g_idx, Q, row_loss, row_clipped, at::full({1}, passes, opts.dtype(at::kLong))};
}

// Shapes only, so torch.compile can trace callers.
EngineOut gptq_quantize_meta(const at::Tensor& W, const at::Tensor&, const at::Tensor&, bool, int64_t,
                             int64_t group_size, bool, bool, bool, int64_t, int64_t, c10::string_view, int64_t) {
  const int64_t d_out = W.size(0), d = W.size(1);
  const int64_t G = group_size == -1 ? 1 : (d + group_size - 1) / group_size;
  const auto o = W.options();
  return {at::empty({d_out, d}, o.dtype(at::kByte)), at::empty({G, d_out}, o), at::empty({G, d_out}, o),
          at::empty({d}, o.dtype(at::kInt)),         at::empty({d_out, d}, o), at::empty({d_out}, o),
          at::empty({d_out}, o.dtype(at::kLong)),    at::empty({1}, o.dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) { m.impl("gptq_quantize", &gptq_quantize); }
TORCH_LIBRARY_IMPL(lrgptq, Meta, m) { m.impl("gptq_quantize", &gptq_quantize_meta); }
#ifdef LRGPTQ_WITH_CUDA
// Same host code: checks and layout in ATen on the device, the block loop in csrc/cuda/gptq.cu.
TORCH_LIBRARY_IMPL(lrgptq, CUDA, m) { m.impl("gptq_quantize", &gptq_quantize); }
#endif

}  // namespace lrgptq
