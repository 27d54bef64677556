// Quantized matmul on the CPU: y = x · dequant(qweight)ᵀ + bias for a GPTQ-layout layer
// (docs/design.md §9), without materialising the float weight.
//
//   w[n, i] = scales[g, n] · (q[i, n] − z[g, n]),  g = g_idx[i]
//   q[i, n]: value i of column n's bit stream in qweight (bitpack.h);
//   z[g, n]: value n of row g's bit stream in qzeros, plus zero_offset (1 for the v1 format,
//            which stores z − 1; 0 for gptq_v2, which stores z).
//
// The inputs are walked one pack block at a time (32 inputs = `bits` word rows of qweight, which
// lie next to each other in memory); no more than a 32 × kPanelN float panel is ever held:
//   - a block inside one group (no act-order, group_size a multiple of 32) factors the grid
//     out: y += s · (x·q − z · Σx), so each weight costs an unpack, a convert and an FMA;
//   - a block that mixes groups (act-order) or is partial dequantizes s · (q − z) per weight, in
//     float32 as the engine does (bit for bit its weights), then y += x · panel.
// Two schedules share these kernels. Few rows of x (decode): each thread takes a contiguous run
// of blocks across all outputs, so it streams its part of qweight front to back, into a private
// partial y; the partials are summed in a fixed order (deterministic for a given thread count).
// Some rows: each thread takes tiles of kTileN outputs through all blocks (no partials). Many
// rows (prefill): compute is what counts, so each thread dequantizes a strip of outputs (1 MiB
// of floats, never the whole weight) and multiplies it with the BLAS GEMM.
// The result equals x · Wᵀ to float32 rounding of the sums, not bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "bitpack.h"
#include "clones.h"
#include "cuda_ops.h"


namespace lrgptq {
namespace {

constexpr int64_t kBlockK = 32;   // inputs per pack block: `bits` whole words for every width
constexpr int64_t kPanelN = 64;   // columns of a float panel: 32 × 64 floats = 8 KiB, in L1
constexpr int64_t kTileN = 256;   // outputs per task when threads split the outputs
constexpr int64_t kSplitRows = 8; // up to this many rows of x, threads split the blocks
constexpr int64_t kGemmRows = 32; // from this many rows, dequantized strips go to the BLAS GEMM
constexpr int64_t kStripBytes = 1 << 20;  // a strip of float weights: 1 MiB, in L2
constexpr int kChains = 4;        // independent sums per output, so a block's 32 FMAs do not all
                                  // wait on each other's latency

struct QLayer {
  const float* x;              // (M, d) row-major
  const int32_t* qw;           // (words(d), d_out)
  const float* S;              // (G, d_out) scales, float32
  const float* Z;              // (G, d_out) zero points z, float32
  const int32_t* g_idx;        // (d)
  const int32_t* block_group;  // per whole block: its one group, or −1 (act-order mix)
  const float* xsum;           // (blocks, M): Σ of x over each block's inputs
  int64_t M, d, d_out;
};

// Code of input k of a pack block, for column n: value k of the column's stream in the block's
// BITS word rows (words = the first row, ld = the row stride). Inside the loops below k is a
// constant (the k loops are fully unrolled), so the word row and the shift are too.
template <int BITS>
inline __attribute__((always_inline)) float code_at(const uint32_t* __restrict words, int64_t ld, int64_t k,
                                                   int64_t n) {
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const int64_t off = k * BITS, w = off >> 5, sh = off & 31;
  uint32_t v = words[w * ld + n] >> sh;
  if (sh + BITS > 32) v |= words[(w + 1) * ld + n] << (32 - sh);  // 3 bits: values 10 and 21 straddle
  return static_cast<float>(static_cast<int32_t>(v & kMask));
}

inline const uint32_t* block_words(const QLayer& L, int64_t blk, int64_t bits) {
  return reinterpret_cast<const uint32_t*>(L.qw + blk * bits * L.d_out);
}

// Panel rows k = 0..KC−1 (inputs blk·32 + k) of the columns [n0, n0 + nc), rows ldp apart.
// WEIGHTS: the dequantized weight S[g_k][n] · (q − Z[g_k][n]); otherwise the code q alone
// (uniform blocks). KC = 0: runtime kc (the last, partial block). The n loop is the vector loop.
template <int BITS, int KC, bool WEIGHTS>
inline __attribute__((always_inline)) void fill_panel(const QLayer& L, int64_t blk, int64_t kc_, int64_t n0,
                                                      int64_t nc, float* __restrict panel, int64_t ldp = kPanelN) {
  const int64_t kc = KC ? KC : kc_;
  const uint32_t* __restrict words = block_words(L, blk, BITS) + n0;
  const int32_t* __restrict gi = L.g_idx + blk * kBlockK;
  const float* __restrict S = L.S + n0;
  const float* __restrict Z = L.Z + n0;
  for (int64_t n = 0; n < nc; ++n) {
#pragma GCC unroll 32
    for (int64_t k = 0; k < kc; ++k) {
      const float q = code_at<BITS>(words, L.d_out, k, n);
      panel[k * ldp + n] = WEIGHTS ? S[gi[k] * L.d_out + n] * (q - Z[gi[k] * L.d_out + n]) : q;
    }
  }
}

// acc[n] (+)= Σ_k xb[k] · panel[k][n] for n < nc; the k loop unrolled inside the vector loop.
template <int KC, bool ADD>
inline __attribute__((always_inline)) void row_times_panel(const float* __restrict xb, int64_t kc_, int64_t nc,
                                                           const float* __restrict panel, float* __restrict acc) {
  const int64_t kc = KC ? KC : kc_;
  for (int64_t n = 0; n < nc; ++n) {
    float a[kChains] = {};
#pragma GCC unroll 32
    for (int64_t k = 0; k < kc; ++k) a[k % kChains] += xb[k] * panel[k * kPanelN + n];
    acc[n] = (ADD ? acc[n] : 0.0f) + ((a[0] + a[1]) + (a[2] + a[3]));
  }
}

// y[:, n0 : n1] (row stride ldy, y pointing at column n0) += the contribution of block blk.
template <int BITS>
inline __attribute__((always_inline)) void block_into(const QLayer& L, int64_t blk, int64_t n0, int64_t n1,
                                                      float* y, int64_t ldy, float* panel) {
  const int64_t kc = std::min(kBlockK, L.d - blk * kBlockK);
  const int32_t g = kc == kBlockK ? L.block_group[blk] : -1;
  const float* x = L.x + blk * kBlockK;
  if (g >= 0 && L.M == 1) {  // decode: codes straight from the words, scale and zero factored out
    const uint32_t* __restrict words = block_words(L, blk, BITS);
    const float* __restrict s = L.S + g * L.d_out;
    const float* __restrict z = L.Z + g * L.d_out;
    const float xs = L.xsum[blk];
    float* __restrict yb = y - n0;
    for (int64_t n = n0; n < n1; ++n) {
      float a[kChains] = {};
#pragma GCC unroll 32
      for (int64_t k = 0; k < kBlockK; ++k) a[k % kChains] += x[k] * code_at<BITS>(words, L.d_out, k, n);
      yb[n] += s[n] * (((a[0] + a[1]) + (a[2] + a[3])) - z[n] * xs);
    }
    return;
  }
  for (int64_t c0 = n0; c0 < n1; c0 += kPanelN) {
    const int64_t nc = std::min(kPanelN, n1 - c0);
    float* yc = y + (c0 - n0);
    if (g >= 0) {  // one group: a panel of codes shared by the rows, y += s · (x·q − z · Σx)
      fill_panel<BITS, kBlockK, false>(L, blk, kBlockK, c0, nc, panel);
      const float* __restrict s = L.S + g * L.d_out + c0;
      const float* __restrict z = L.Z + g * L.d_out + c0;
      for (int64_t b = 0; b < L.M; ++b) {
        float acc[kPanelN];
        row_times_panel<kBlockK, false>(x + b * L.d, kBlockK, nc, panel, acc);
        const float xs = L.xsum[blk * L.M + b];
        float* __restrict yb = yc + b * ldy;
        for (int64_t n = 0; n < nc; ++n) yb[n] += s[n] * (acc[n] - z[n] * xs);
      }
    } else if (kc == kBlockK) {  // act-order: a panel of dequantized weights
      fill_panel<BITS, kBlockK, true>(L, blk, kBlockK, c0, nc, panel);
      for (int64_t b = 0; b < L.M; ++b) row_times_panel<kBlockK, true>(x + b * L.d, kBlockK, nc, panel, yc + b * ldy);
    } else {  // the last block, shorter than 32 inputs
      fill_panel<BITS, 0, true>(L, blk, kc, c0, nc, panel);
      for (int64_t b = 0; b < L.M; ++b) row_times_panel<0, true>(x + b * L.d, kc, nc, panel, yc + b * ldy);
    }
  }
}

// Blocks [b0, b1) into the columns [n0, n1) of y (row stride ldy, y pointing at column n0).
LRGPTQ_CLONES void run_blocks(const QLayer& L, int64_t bits, int64_t b0, int64_t b1, int64_t n0, int64_t n1,
                              float* y, int64_t ldy, float* panel) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    // Ask for the next block's words while this one computes: a decode step is one pass over
    // qweight, and the hardware prefetcher alone leaves it waiting on DRAM (measured ~2x).
    if (blk + 1 < b1) {
      const int64_t row = (blk + 1) * bits, rows = std::min(bits, packed_words(L.d, bits) - row);
      for (int64_t w = 0; w < rows; ++w)
        for (int64_t n = n0; n < n1; n += 16) __builtin_prefetch(L.qw + (row + w) * L.d_out + n);
    }
    switch (bits) {
      case 2: block_into<2>(L, blk, n0, n1, y, ldy, panel); break;
      case 3: block_into<3>(L, blk, n0, n1, y, ldy, panel); break;
      case 4: block_into<4>(L, blk, n0, n1, y, ldy, panel); break;
      default: block_into<8>(L, blk, n0, n1, y, ldy, panel); break;
    }
  }
}

// The dequantized weights of the columns [n0, n0 + nc), all inputs: W (d, nc) row-major, as the
// engine computes them (s · (q − z) in float32), for a GEMM when x has many rows.
LRGPTQ_CLONES void dequant_strip(const QLayer& L, int64_t bits, int64_t n0, int64_t nc, float* W) {
  const int64_t full = L.d / kBlockK;
  for (int64_t blk = 0; blk <= full; ++blk) {
    const int64_t kc = std::min(kBlockK, L.d - blk * kBlockK);
    float* panel = W + blk * kBlockK * nc;
    if (kc == kBlockK) {
      switch (bits) {
        case 2: fill_panel<2, kBlockK, true>(L, blk, kc, n0, nc, panel, nc); break;
        case 3: fill_panel<3, kBlockK, true>(L, blk, kc, n0, nc, panel, nc); break;
        case 4: fill_panel<4, kBlockK, true>(L, blk, kc, n0, nc, panel, nc); break;
        default: fill_panel<8, kBlockK, true>(L, blk, kc, n0, nc, panel, nc); break;
      }
    } else if (kc > 0) {
      switch (bits) {
        case 2: fill_panel<2, 0, true>(L, blk, kc, n0, nc, panel, nc); break;
        case 3: fill_panel<3, 0, true>(L, blk, kc, n0, nc, panel, nc); break;
        case 4: fill_panel<4, 0, true>(L, blk, kc, n0, nc, panel, nc); break;
        default: fill_panel<8, 0, true>(L, blk, kc, n0, nc, panel, nc); break;
      }
    }
  }
}

// Rows [g0, g1) of Z[g][n] = the stored zero point + zero_offset, as float. Row g of qzeros is
// a stream over the outputs; for 2, 4 and 8 bits each word holds 32/bits whole values.
template <int BITS>
inline __attribute__((always_inline)) void zero_row(const int32_t* qz, int64_t d_out, float offset, float* z) {
  constexpr int64_t kPer = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const int64_t whole = BITS == 3 ? 0 : d_out / kPer;
  for (int64_t w = 0; w < whole; ++w) {
    const uint32_t word = static_cast<uint32_t>(qz[w]);
#pragma GCC unroll 16
    for (int64_t j = 0; j < kPer; ++j) z[w * kPer + j] = static_cast<float>((word >> (BITS * j)) & kMask) + offset;
  }
  for (int64_t n = whole * kPer; n < d_out; ++n) z[n] = static_cast<float>(stream_get(qz, 1, n, BITS)) + offset;
}

LRGPTQ_CLONES void zero_rows(const int32_t* qz, int64_t zw, int64_t d_out, int64_t bits, float offset, int64_t g0,
                             int64_t g1, float* z) {
  for (int64_t g = g0; g < g1; ++g) {
    switch (bits) {
      case 2: zero_row<2>(qz + g * zw, d_out, offset, z + g * d_out); break;
      case 3: zero_row<3>(qz + g * zw, d_out, offset, z + g * d_out); break;
      case 4: zero_row<4>(qz + g * zw, d_out, offset, z + g * d_out); break;
      default: zero_row<8>(qz + g * zw, d_out, offset, z + g * d_out); break;
    }
  }
}

at::Tensor zero_points(const at::Tensor& qzeros, int64_t bits, int64_t d_out, int64_t zero_offset) {
  at::Tensor Z = at::empty({qzeros.size(0), d_out}, qzeros.options().dtype(at::kFloat));
  at::parallel_for(0, qzeros.size(0), 1, [&](int64_t g0, int64_t g1) {
    zero_rows(qzeros.data_ptr<int32_t>(), qzeros.size(1), d_out, bits, static_cast<float>(zero_offset), g0, g1,
              Z.data_ptr<float>());
  });
  return Z;
}

void check_layer(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                 const at::Tensor& g_idx, int64_t bits, int64_t zero_offset, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(valid_bits(bits), "lrgptq.qmatmul: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(zero_offset == 0 || zero_offset == 1,
              "lrgptq.qmatmul: zero_offset must be 1 (format gptq, stores z − 1) or 0 (gptq_v2), got ", zero_offset);
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()),
              "lrgptq.qmatmul: x must be a floating-point tensor (..., in_features), got ", x.scalar_type(),
              " of shape ", x.sizes());
  TORCH_CHECK(scales.dim() == 2 && at::isFloatingType(scales.scalar_type()),
              "lrgptq.qmatmul: scales must be a 2-D float tensor (groups, out_features), got ", scales.scalar_type(),
              " of shape ", scales.sizes());
  const int64_t d = x.size(-1), G = scales.size(0), d_out = scales.size(1);
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.size(0) == packed_words(d, bits) &&
                  qweight.size(1) == d_out,
              "lrgptq.qmatmul: qweight must be int32 of shape (", packed_words(d, bits), ", ", d_out, ") for ", d,
              " inputs of ", bits, " bits and ", d_out, " outputs, got ", qweight.scalar_type(), " of shape ",
              qweight.sizes());
  TORCH_CHECK(qzeros.scalar_type() == at::kInt && qzeros.dim() == 2 && qzeros.size(0) == G &&
                  qzeros.size(1) == packed_words(d_out, bits),
              "lrgptq.qmatmul: qzeros must be int32 of shape (", G, ", ", packed_words(d_out, bits), "), got ",
              qzeros.scalar_type(), " of shape ", qzeros.sizes());
  TORCH_CHECK(g_idx.scalar_type() == at::kInt && g_idx.dim() == 1 && g_idx.size(0) == d,
              "lrgptq.qmatmul: g_idx must be int32 of length in_features = ", d, ", got ", g_idx.scalar_type(),
              " of shape ", g_idx.sizes());
  TORCH_CHECK(d == 0 || (G > 0 && g_idx.min().item<int32_t>() >= 0 && g_idx.max().item<int32_t>() < G),
              "lrgptq.qmatmul: g_idx must hold group indices in 0..", G - 1, " (scales has ", G, " rows)");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out && at::isFloatingType(bias->scalar_type()),
                "lrgptq.qmatmul: bias must be a float vector of length out_features = ", d_out, ", got ",
                bias->scalar_type(), " of shape ", bias->sizes());
  for (const at::Tensor* t : {&qweight, &qzeros, &scales, &g_idx})
    TORCH_CHECK(t->device() == x.device(), "lrgptq.qmatmul: x, qweight, qzeros, scales and g_idx must be on one ",
                "device, got x on ", x.device(), " and a tensor on ", t->device(), "; move the layer to x's device");
  if (bias.has_value())
    TORCH_CHECK(bias->device() == x.device(), "lrgptq.qmatmul: bias must be on x's device ", x.device(), ", got ",
                bias->device());
}

// Y (M, d_out) float32 + bias, in x's dtype and shape (..., d_out).
at::Tensor finish_output(at::Tensor& Y, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) Y.add_(bias->to(at::kFloat));
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = Y.size(1);
  return Y.to(x.scalar_type()).reshape(out_sizes);
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                   const at::Tensor& scales, const at::Tensor& g_idx, int64_t bits, int64_t zero_offset,
                   const std::optional<at::Tensor>& bias) {
  check_layer(x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias);
  const int64_t d = x.size(-1), d_out = scales.size(1);
  at::Tensor X = x.reshape({-1, d}).to(at::kFloat).contiguous();
  const int64_t M = X.size(0);
  at::Tensor S = scales.to(at::kFloat).contiguous();
  if (x.is_cuda()) {
#ifdef LRGPTQ_WITH_CUDA
    at::Tensor Yc = qmatmul_cuda(X, qweight.contiguous(), qzeros.contiguous(), S, g_idx.contiguous(), bits, zero_offset);
    return finish_output(Yc, x, bias);
#else
    TORCH_CHECK(false, "lrgptq.qmatmul: this build has no CUDA kernels; rebuild with a CUDA torch");
#endif
  }
  at::Tensor Y = at::zeros({M, d_out}, X.options());
  at::Tensor Z = zero_points(qzeros.contiguous(), bits, d_out, zero_offset);
  at::Tensor qw = qweight.contiguous(), gi = g_idx.contiguous();
  // Whole blocks of 32 inputs inside one group take the factored form; they need Σ x per block.
  const int64_t full = d / kBlockK, blocks = (d + kBlockK - 1) / kBlockK;
  at::Tensor block_group = at::full({full}, -1, gi.options());
  if (full > 0) {
    at::Tensor gb = gi.narrow(0, 0, full * kBlockK).view({full, kBlockK});
    at::Tensor first = gb.select(1, 0);
    block_group = at::where((gb == first.unsqueeze(1)).all(1), first, block_group).contiguous();
  }
  at::Tensor xsum = full > 0 ? X.narrow(1, 0, full * kBlockK).view({M, full, kBlockK}).sum(2).t().contiguous()
                             : at::zeros({1}, X.options());
  const QLayer L{X.data_ptr<float>(), qw.data_ptr<int32_t>(), S.data_ptr<float>(), Z.data_ptr<float>(),
                 gi.data_ptr<int32_t>(), block_group.data_ptr<int32_t>(), xsum.data_ptr<float>(), M, d, d_out};
  float* y = Y.data_ptr<float>();
  if (M > 0 && d > 0 && d_out > 0) {
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), blocks);
    if (M <= kSplitRows && parts > 1) {  // threads split the blocks: contiguous streams of qweight
      at::Tensor partial = at::zeros({parts - 1, M, d_out}, X.options());
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        std::vector<float> panel(kBlockK * kPanelN);
        for (int64_t p = p0; p < p1; ++p) {
          float* yp = p == 0 ? y : partial.data_ptr<float>() + (p - 1) * M * d_out;
          run_blocks(L, bits, blocks * p / parts, blocks * (p + 1) / parts, 0, d_out, yp, d_out, panel.data());
        }
      });
      Y.add_(partial.sum(0));  // a fixed order: the same result for the same thread count
    } else if (M >= kGemmRows) {  // many rows: dequantize a strip of outputs, then one GEMM
      const int64_t strip = std::max<int64_t>(kPanelN, (kStripBytes / 4 / d) / kPanelN * kPanelN);
      at::parallel_for(0, (d_out + strip - 1) / strip, 1, [&](int64_t t0, int64_t t1) {
        at::Tensor W = at::empty({d * strip}, X.options());
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = t * strip, nc = std::min(strip, d_out - n0);
          dequant_strip(L, bits, n0, nc, W.data_ptr<float>());
          Y.narrow(1, n0, nc).copy_(at::mm(X, W.narrow(0, 0, d * nc).view({d, nc})));
        }
      });
    } else {  // threads split the outputs
      at::parallel_for(0, (d_out + kTileN - 1) / kTileN, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> panel(kBlockK * kPanelN);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = t * kTileN, n1 = std::min(d_out, n0 + kTileN);
          run_blocks(L, bits, 0, blocks, n0, n1, y + n0, d_out, panel.data());
        }
      });
    }
  }
  return finish_output(Y, x, bias);
}

// Shapes only, so torch.compile can trace QuantLinear.
at::Tensor qmatmul_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor& scales,
                        const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&) {
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = scales.size(1);
  return at::empty(out_sizes, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) { m.impl("qmatmul", &qmatmul); }
TORCH_LIBRARY_IMPL(lrgptq, Meta, m) { m.impl("qmatmul", &qmatmul_meta); }
#ifdef LRGPTQ_WITH_CUDA
// Same checks and output handling; the products in csrc/cuda/qmatmul.cu.
TORCH_LIBRARY_IMPL(lrgptq, CUDA, m) { m.impl("qmatmul", &qmatmul); }
#endif

}  // namespace lrgptq
