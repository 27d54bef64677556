// The GPTQ engine (DESIGN §4). In perm order, with targets T (initially W[:, perm]):
//   q_j = quant(T_j);  e_j = (base_j − Q_j)/U_jj  (base = T_j, or the original w_j for the ql form)
//   T_l −= e_j · U_jl  for l > j inside the block;   T[:, i2:] −= E_block · U[i1:i2, i2:] (one GEMM)
//   loss += (T_j − Q_j)² / U_jj².   Columns j >= k (past rank) are rounded with no feedback.
// Group parameters come from the fully updated targets of the group's columns: blocks are cut at
// every group start whose group would straddle the block end, so Q does not depend on the block size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "cuda_ops.h"
#include "gptq_blocks.h"
#include "quantizer.h"

namespace lrgptq {
namespace {

using EngineOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kRowTile = 16;  // rows whose block segment (16 × B values) stays in L1

template <typename T>
struct Problem {
  int64_t d_out, d, k, gsz;
  bool from_original, sym, mse, static_groups;
  T maxq;
  T* Tw;              // targets, (d_out, d) row-major, perm order
  const T* W0;        // original weights in perm order (ql form) or nullptr
  const T* U;         // (k, d) row-major, perm order
  const int64_t* perm;
  T* scales;          // (G, d_out)
  T* zeros;           // (G, d_out)
  uint8_t* codes;     // (d_out, d), perm order
  T* Qp;              // (d_out, d), perm order
  T* E;               // (d_out, B) scaled errors of the current block
  int64_t ldE;
  T* row_loss;        // (d_out)
};

// Rows [r0, r1) through the block columns [i1, i2): the sequential hot loop.
template <typename T>
void block_rows(const Problem<T>& P, int64_t i1, int64_t i2, int64_t r0, int64_t r1) {
  const int64_t d = P.d;
  for (int64_t r = r0; r < r1; ++r) {
    T* t = P.Tw + r * d;
    T* e = P.E + r * P.ldE;
    T loss = 0;
    for (int64_t j = i1; j < i2; ++j) {
      if (!P.static_groups && j % P.gsz == 0) {  // group params from the fully updated targets
        const Grid<T> g = find_grid(t + j, std::min(P.gsz, d - j), P.maxq, P.sym, P.mse);
        P.scales[(j / P.gsz) * P.d_out + r] = g.scale;
        P.zeros[(j / P.gsz) * P.d_out + r] = g.zero;
      }
      const int64_t grp = (P.static_groups ? P.perm[j] : j) / P.gsz;
      const Grid<T> g{P.scales[grp * P.d_out + r], P.zeros[grp * P.d_out + r]};
      const T q = quant_code(t[j], g, P.maxq);
      const T Q = dequant(q, g);
      P.codes[r * d + j] = static_cast<uint8_t>(q);
      P.Qp[r * d + j] = Q;
      if (j >= P.k) {
        e[j - i1] = 0;
        continue;
      }
      const T* u = P.U + j * d;
      const T base = P.from_original ? P.W0[r * d + j] : t[j];
      const T err = (base - Q) / u[j];
      const T res = (t[j] - Q) / u[j];
      loss += res * res;
      e[j - i1] = err;
      for (int64_t l = j + 1; l < i2; ++l) t[l] -= err * u[l];
    }
    P.row_loss[r] += loss;
  }
}

template <typename T>
void run_engine(Problem<T>& P, const at::Tensor& Tw, const at::Tensor& U, const at::Tensor& E, int64_t B) {
  const int64_t n_tiles = (P.d_out + kRowTile - 1) / kRowTile;
  for (int64_t i1 = 0; i1 < P.d;) {
    const int64_t i2 = block_end(i1, B, P.d, P.gsz, P.static_groups);
    at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t tile = t0; tile < t1; ++tile)
        block_rows(P, i1, i2, tile * kRowTile, std::min((tile + 1) * kRowTile, P.d_out));
    });
    // Lazy batch update of the columns after the block: T[:, i2:] −= E[:, :kb] U[i1:i1+kb, i2:].
    const int64_t kb = std::max<int64_t>(0, std::min(i2, P.k) - i1);
    if (i2 < P.d && kb > 0)
      Tw.narrow(1, i2, P.d - i2).addmm_(E.narrow(1, 0, kb), U.narrow(0, i1, kb).narrow(1, i2, P.d - i2), 1, -1);
    i1 = i2;
  }
}

// Static groups: params of group g from the original W[:, g·gsz : (g+1)·gsz] before any update.
template <typename T>
void static_grids(const Problem<T>& P, const at::Tensor& W) {
  const int64_t G = (P.d + P.gsz - 1) / P.gsz;
  const T* w = W.data_ptr<T>();
  at::parallel_for(0, P.d_out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const Grid<T> grid =
            find_grid(w + r * P.d + g * P.gsz, std::min(P.gsz, P.d - g * P.gsz), P.maxq, P.sym, P.mse);
        P.scales[g * P.d_out + r] = grid.scale;
        P.zeros[g * P.d_out + r] = grid.zero;
      }
  });
}

void check_inputs(const at::Tensor& W, const at::Tensor& perm, const at::Tensor& U, int64_t bits,
                  int64_t group_size, int64_t block_size) {
  TORCH_CHECK(W.dim() == 2, "lrgptq.gptq_quantize: W must be 2-D (d_out, d), got shape ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kDouble || W.scalar_type() == at::kFloat,
              "lrgptq.gptq_quantize: W must be float32 or float64 (the compute dtype), got ", W.scalar_type());
  const int64_t d = W.size(1);
  TORCH_CHECK(perm.device() == W.device() && U.device() == W.device(),
              "lrgptq.gptq_quantize: W, perm and U must be on one device, got W on ", W.device(), ", perm on ",
              perm.device(), ", U on ", U.device(), "; move them with .to(W.device)");
  TORCH_CHECK(bits >= 2 && bits <= 8, "lrgptq.gptq_quantize: bits must be in 2..8, got ", bits);
  TORCH_CHECK(group_size == -1 || group_size > 0,
              "lrgptq.gptq_quantize: group_size must be -1 (one group per row) or positive, got ", group_size);
  TORCH_CHECK(block_size >= 1, "lrgptq.gptq_quantize: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == d && perm.scalar_type() == at::kLong,
              "lrgptq.gptq_quantize: perm must be an int64 vector of length d = ", d, ", got ",
              perm.scalar_type(), " of shape ", perm.sizes());
  TORCH_CHECK(d == 0 || at::equal(std::get<0>(at::sort(perm)), at::arange(d, perm.options())),
              "lrgptq.gptq_quantize: perm must be a permutation of 0..d-1");
  TORCH_CHECK(U.dim() == 2 && U.size(1) == d && U.size(0) <= d,
              "lrgptq.gptq_quantize: U must be (k, d) with k <= d = ", d, ", got shape ", U.sizes());
  check_float(U, "gptq_quantize", "U");
  check_finite(W, "gptq_quantize", "W");
  check_finite(U, "gptq_quantize", "U");
  TORCH_CHECK(U.size(0) == 0 || (U.diagonal() != 0).all().item<bool>(),
              "lrgptq.gptq_quantize: U has a zero pivot U_jj; the factor route must put columns past rank last");
}

EngineOut gptq_quantize(const at::Tensor& W, const at::Tensor& perm, const at::Tensor& U_in, bool from_original,
                        int64_t bits, int64_t group_size, bool sym, bool mse, bool static_groups,
                        int64_t block_size) {
  check_inputs(W, perm, U_in, bits, group_size, block_size);
  const int64_t d_out = W.size(0), d = W.size(1);
  const int64_t gsz = group_size == -1 ? std::max<int64_t>(d, 1) : group_size;
  const int64_t G = (d + gsz - 1) / gsz;  // the last group is shorter when gsz does not divide d
  const auto opts = W.options();
  at::Tensor Wc = W.contiguous();
  const bool identity = at::equal(perm, at::arange(d, perm.options()));
  at::Tensor Tw = identity ? Wc.clone() : Wc.index_select(1, perm).contiguous();
  at::Tensor W0 = from_original ? Tw.clone() : at::Tensor();
  at::Tensor U = U_in.to(W.scalar_type()).contiguous();
  at::Tensor scales = at::zeros({G, d_out}, opts), zeros = at::zeros({G, d_out}, opts);
  at::Tensor codes_p = at::empty({d_out, d}, opts.dtype(at::kByte));
  at::Tensor Q_p = at::empty({d_out, d}, opts);
  const int64_t B = std::min(block_size, std::max<int64_t>(d, 1));
  at::Tensor row_loss = at::zeros({d_out}, opts);
  at::Tensor perm_c = perm.contiguous();

  if (W.is_cuda()) {
#ifdef LRGPTQ_WITH_CUDA
    gptq_engine_cuda({Tw, W0, Wc, U, perm_c, scales, zeros, codes_p, Q_p, row_loss},
                     {gsz, bits, B, from_original, sym, mse, static_groups});
#else
    TORCH_CHECK(false, "lrgptq.gptq_quantize: this build has no CUDA kernels; rebuild with a CUDA torch");
#endif
  } else {
    at::Tensor E = at::zeros({d_out, B}, opts);
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "gptq_quantize", [&] {
      Problem<scalar_t> P{d_out, d, U.size(0), gsz, from_original, sym, mse, static_groups,
                          static_cast<scalar_t>((1 << bits) - 1), Tw.data_ptr<scalar_t>(),
                          from_original ? W0.data_ptr<scalar_t>() : nullptr, U.data_ptr<scalar_t>(),
                          perm_c.data_ptr<int64_t>(), scales.data_ptr<scalar_t>(), zeros.data_ptr<scalar_t>(),
                          codes_p.data_ptr<uint8_t>(), Q_p.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(), B,
                          row_loss.data_ptr<scalar_t>()};
      if (static_groups) static_grids(P, Wc);
      run_engine(P, Tw, U, E, B);
    });
  }

  // Back to the original column order.
  at::Tensor codes = identity ? codes_p : at::empty_like(codes_p).index_copy_(1, perm, codes_p);
  at::Tensor Q = identity ? Q_p : at::empty_like(Q_p).index_copy_(1, perm, Q_p);
  at::Tensor g_idx;
  if (static_groups || identity) {
    g_idx = at::arange(d, opts.dtype(at::kInt)).div_(gsz, "floor");
  } else {  // act-order: group j // gsz assigned in perm order, mapped back
    g_idx = at::empty({d}, opts.dtype(at::kInt))
                .index_copy_(0, perm, at::arange(d, opts.dtype(at::kInt)).div_(gsz, "floor"));
  }
  return {codes, scales, zeros, g_idx, Q, row_loss};
}

// Shapes only, so torch.compile can trace callers.
EngineOut gptq_quantize_meta(const at::Tensor& W, const at::Tensor& perm, const at::Tensor& U, bool,
                             int64_t, int64_t group_size, bool, bool, bool, int64_t) {
  const int64_t d_out = W.size(0), d = W.size(1);
  const int64_t G = group_size == -1 ? 1 : (d + group_size - 1) / group_size;
  const auto o = W.options();
  return {at::empty({d_out, d}, o.dtype(at::kByte)), at::empty({G, d_out}, o), at::empty({G, d_out}, o),
          at::empty({d}, o.dtype(at::kInt)), at::empty({d_out, d}, o), at::empty({d_out}, o)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) { m.impl("gptq_quantize", &gptq_quantize); }
TORCH_LIBRARY_IMPL(lrgptq, Meta, m) { m.impl("gptq_quantize", &gptq_quantize_meta); }
#ifdef LRGPTQ_WITH_CUDA
// Same host code: checks and layout in ATen on the device, the block loop in csrc/cuda/gptq.cu.
TORCH_LIBRARY_IMPL(lrgptq, CUDA, m) { m.impl("gptq_quantize", &gptq_quantize); }
#endif

}  // namespace lrgptq
