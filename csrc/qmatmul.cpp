// Quantized matmul on the CPU: y = x · dequant(qweight)ᵀ + bias for a GPTQ-layout layer
// (DESIGN §9), without materialising the float weight.
//
//   w[n, i] = scales[g, n] · (q[i, n] − z[g, n]),  g = g_idx[i]
//   q[i, n]: value i of column n's bit stream in qweight (bitpack.h);
//   z[g, n]: value n of row g's bit stream in qzeros, plus zero_offset (1 for the v1 format,
//            which stores z − 1; 0 for gptq_v2, which stores z).
//
// The outputs are cut into tiles of kTileN columns, one task each (at::parallel_for). A task
// turns its tile's scales and zero points into float tables once, then walks the inputs one
// pack block at a time (32 inputs = `bits` words per column), never holding more than a
// 32 × kTileN float panel (in L1):
//   - a block inside one group (no act-order, group_size a multiple of 32) factors the grid
//     out: y += s · (x·q − z · Σx), so each weight costs an unpack, a convert and an FMA;
//   - a block that mixes groups (act-order) or is partial dequantizes s · (q − z) per weight, in
//     float32 as the engine does (bit for bit its weights), then y += x · panel.
// The result equals x · Wᵀ to float32 rounding of the sums, not bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "bitpack.h"

// The hot loops are written to auto-vectorise; build them for AVX-512 and AVX2 too and let the
// loader pick the widest the CPU has (the default build targets baseline x86-64 only).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LRGPTQ_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define LRGPTQ_CLONES
#endif

namespace lrgptq {
namespace {

constexpr int64_t kTileN = 256;   // output columns per task: 1 KiB runs of each word row
constexpr int64_t kPanelN = 64;   // columns of a float panel: 32 × 64 floats = 8 KiB, in L1
constexpr int64_t kBlockK = 32;  // inputs per pack block: `bits` whole words for every width

struct QLayer {
  const float* x;        // (M, d) row-major
  float* y;              // (M, d_out) row-major
  const int32_t* qw;     // (words(d), d_out)
  const int32_t* qz;     // (G, words(d_out))
  const float* scales;   // (G, d_out), float32
  const int32_t* g_idx;  // (d)
  const int32_t* block_group;  // per pack block: its one group, or −1 (act-order mix or partial block)
  const float* xsum;     // (blocks, M): Σ of x over each block's inputs, for the uniform-block form
  int64_t M, d, d_out, G, zwords, bits;
  float zero_offset;
};

// Code of input k of a pack block, for the tile's column n: value k of the column's stream in
// the block's BITS word rows (words = the first row, ld = the row stride). Inside the loops
// below k is a constant (the k loops are fully unrolled), so the word row and shift are too.
template <int BITS>
inline __attribute__((always_inline)) float code_at(const uint32_t* __restrict words, int64_t ld, int64_t k,
                                                   int64_t n) {
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const int64_t off = k * BITS, w = off >> 5, sh = off & 31;
  uint32_t v = words[w * ld + n] >> sh;
  if (sh + BITS > 32) v |= words[(w + 1) * ld + n] << (32 - sh);  // 3 bits: values 10 and 21 straddle
  return static_cast<float>(static_cast<int32_t>(v & kMask));
}

// The tile's columns of a pack block's first word row.
inline const uint32_t* block_words(const QLayer& L, int64_t blk, int64_t bits, int64_t n0) {
  return reinterpret_cast<const uint32_t*>(L.qw + blk * bits * L.d_out + n0);
}

// Panel rows k = 0..KC−1 (inputs blk·32 + k) of the columns [n0, n0 + nc), nc <= kPanelN.
// WEIGHTS: the dequantized weight S[g_k][n] · (q − Z[g_k][n]) (S, Z: this panel's columns of
// the tile's tables); otherwise the code q alone (uniform blocks). KC = 0: runtime kc (the last,
// partial block). The n loop is the vector loop.
template <int BITS, int KC, bool WEIGHTS>
inline __attribute__((always_inline)) void fill_panel(const QLayer& L, int64_t blk, int64_t kc_, int64_t n0,
                                                      int64_t nc, const float* __restrict S,
                                                      const float* __restrict Z, float* __restrict panel) {
  const int64_t kc = KC ? KC : kc_;
  const uint32_t* __restrict words = block_words(L, blk, BITS, n0);
  const int32_t* __restrict gi = L.g_idx + blk * kBlockK;
  for (int64_t n = 0; n < nc; ++n) {
#pragma GCC unroll 32
    for (int64_t k = 0; k < kc; ++k) {
      const float q = code_at<BITS>(words, L.d_out, k, n);
      panel[k * kPanelN + n] = WEIGHTS ? S[gi[k] * kTileN + n] * (q - Z[gi[k] * kTileN + n]) : q;
    }
  }
}

// acc[n] (+)= Σ_k xb[k] · panel[k][n] for n < nc; the k loop unrolled inside the vector loop.
template <int KC, bool ADD>
inline __attribute__((always_inline)) void row_times_panel(const float* __restrict xb, int64_t kc_, int64_t nc,
                                                           const float* __restrict panel, float* __restrict acc) {
  const int64_t kc = KC ? KC : kc_;
  for (int64_t n = 0; n < nc; ++n) {
    float a = ADD ? acc[n] : 0.0f;
#pragma GCC unroll 32
    for (int64_t k = 0; k < kc; ++k) a += xb[k] * panel[k * kPanelN + n];
    acc[n] = a;
  }
}

// A block whose inputs mix groups (act-order), or a partial block: y += x · (weight panel),
// one panel of kPanelN columns at a time.
template <int BITS, int KC>
inline __attribute__((always_inline)) void mixed_block(const QLayer& L, int64_t blk, int64_t kc, int64_t n0,
                                                       int64_t nt, const float* S, const float* Z, float* panel) {
  for (int64_t c0 = 0; c0 < nt; c0 += kPanelN) {
    const int64_t nc = std::min(kPanelN, nt - c0);
    fill_panel<BITS, KC, true>(L, blk, kc, n0 + c0, nc, S + c0, Z + c0, panel);
    for (int64_t b = 0; b < L.M; ++b)
      row_times_panel<KC, true>(L.x + b * L.d + blk * kBlockK, kc, nc, panel, L.y + b * L.d_out + n0 + c0);
  }
}

// A whole block inside one group g (no act-order): the scale and zero point factor out,
//   Σ_k x_k · s (q_k − z) = s · (Σ_k x_k q_k − z · Σ_k x_k),
// so each weight costs an unpack, a convert and a multiply-add. One row (decode) reads the
// codes straight from the words; more rows share panels of codes.
template <int BITS>
inline __attribute__((always_inline)) void uniform_block(const QLayer& L, int64_t blk, int64_t g, int64_t n0,
                                                         int64_t nt, const float* S, const float* Z, float* panel) {
  if (L.M == 1) {
    const uint32_t* __restrict words = block_words(L, blk, BITS, n0);
    const float* __restrict xb = L.x + blk * kBlockK;
    const float* __restrict s = S + g * kTileN;
    const float* __restrict z = Z + g * kTileN;
    const float xs = L.xsum[blk];
    float* __restrict y = L.y + n0;
    for (int64_t n = 0; n < nt; ++n) {
      float a = 0.0f;
#pragma GCC unroll 32
      for (int64_t k = 0; k < kBlockK; ++k) a += xb[k] * code_at<BITS>(words, L.d_out, k, n);
      y[n] += s[n] * (a - z[n] * xs);
    }
    return;
  }
  for (int64_t c0 = 0; c0 < nt; c0 += kPanelN) {
    const int64_t nc = std::min(kPanelN, nt - c0);
    const float* __restrict s = S + g * kTileN + c0;
    const float* __restrict z = Z + g * kTileN + c0;
    fill_panel<BITS, kBlockK, false>(L, blk, kBlockK, n0 + c0, nc, S, Z, panel);
    for (int64_t b = 0; b < L.M; ++b) {
      float acc[kPanelN];
      row_times_panel<kBlockK, false>(L.x + b * L.d + blk * kBlockK, kBlockK, nc, panel, acc);
      const float xs = L.xsum[blk * L.M + b];
      float* __restrict yb = L.y + b * L.d_out + n0 + c0;
      for (int64_t n = 0; n < nc; ++n) yb[n] += s[n] * (acc[n] - z[n] * xs);
    }
  }
}

template <int BITS>
inline __attribute__((always_inline)) void tile_body(const QLayer& L, int64_t n0, int64_t nt, const float* S,
                                                     const float* Z, float* panel) {
  const int64_t full = L.d / kBlockK;
  for (int64_t blk = 0; blk < full; ++blk) {
    const int32_t g = L.block_group[blk];
    if (g >= 0)
      uniform_block<BITS>(L, blk, g, n0, nt, S, Z, panel);
    else
      mixed_block<BITS, kBlockK>(L, blk, kBlockK, n0, nt, S, Z, panel);
  }
  if (const int64_t kc = L.d - full * kBlockK; kc > 0)  // the last block may be partial
    mixed_block<BITS, 0>(L, full, kc, n0, nt, S, Z, panel);
}

// One output tile [n0, n0 + nt): float tables of its scales and zero points, then the blocks.
LRGPTQ_CLONES void qmatmul_tile(const QLayer& L, int64_t n0, int64_t nt, float* S, float* Z, float* panel) {
  for (int64_t g = 0; g < L.G; ++g) {
    const int32_t* zrow = L.qz + g * L.zwords;  // row g of qzeros: a stream along the outputs
    for (int64_t n = 0; n < nt; ++n) {
      S[g * kTileN + n] = L.scales[g * L.d_out + n0 + n];
      Z[g * kTileN + n] = static_cast<float>(stream_get(zrow, 1, n0 + n, L.bits)) + L.zero_offset;
    }
  }
  switch (L.bits) {
    case 2: tile_body<2>(L, n0, nt, S, Z, panel); break;
    case 3: tile_body<3>(L, n0, nt, S, Z, panel); break;
    case 4: tile_body<4>(L, n0, nt, S, Z, panel); break;
    default: tile_body<8>(L, n0, nt, S, Z, panel); break;
  }
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
  for (const at::Tensor* t : {&x, &qweight, &qzeros, &scales, &g_idx})
    TORCH_CHECK(t->device().is_cpu(), "lrgptq.qmatmul: the CPU kernel needs CPU tensors; the CUDA kernel is not ",
                "written yet");
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                   const at::Tensor& scales, const at::Tensor& g_idx, int64_t bits, int64_t zero_offset,
                   const std::optional<at::Tensor>& bias) {
  check_layer(x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias);
  const int64_t d = x.size(-1), d_out = scales.size(1);
  at::Tensor X = x.reshape({-1, d}).to(at::kFloat).contiguous();
  at::Tensor Y = at::zeros({X.size(0), d_out}, X.options());
  at::Tensor S32 = scales.to(at::kFloat).contiguous();
  at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), gi = g_idx.contiguous();
  // Blocks of 32 inputs that lie in one group take the factored form (uniform_block); they need
  // the sums of x over each block.
  const int64_t full = d / kBlockK;
  at::Tensor block_group = at::full({full}, -1, gi.options());
  if (full > 0) {
    at::Tensor gb = gi.narrow(0, 0, full * kBlockK).view({full, kBlockK});
    at::Tensor first = gb.select(1, 0);
    block_group = at::where((gb == first.unsqueeze(1)).all(1), first, block_group).contiguous();
  }
  at::Tensor xsum = full > 0 ? X.narrow(1, 0, full * kBlockK).view({X.size(0), full, kBlockK}).sum(2).t().contiguous()
                             : at::zeros({0}, X.options());
  const QLayer L{X.data_ptr<float>(), Y.data_ptr<float>(), qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(),
                 S32.data_ptr<float>(), gi.data_ptr<int32_t>(), block_group.data_ptr<int32_t>(),
                 xsum.data_ptr<float>(), X.size(0), d, d_out, scales.size(0), qzeros.size(1), bits,
                 static_cast<float>(zero_offset)};
  const int64_t tiles = (d_out + kTileN - 1) / kTileN;
  if (L.M > 0 && d > 0)
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> S(L.G * kTileN), Z(L.G * kTileN), panel(kBlockK * kPanelN);
      for (int64_t t = t0; t < t1; ++t)
        qmatmul_tile(L, t * kTileN, std::min(kTileN, d_out - t * kTileN), S.data(), Z.data(), panel.data());
    });
  if (bias.has_value()) Y.add_(bias->to(at::kFloat));
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = d_out;
  return Y.to(x.scalar_type()).reshape(out_sizes);
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

}  // namespace lrgptq
