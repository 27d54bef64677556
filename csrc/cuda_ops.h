// The CUDA backends of the ops (csrc/cuda/*.cu), called by the device-generic host code in
// csrc/*.cpp after it has checked the inputs and allocated the outputs on the input's device.
// Declared in plain C++ (no CUDA headers), defined only when the build has LRGPTQ_WITH_CUDA.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace lrgptq {

// Everything the GPTQ engine (docs/design.md §4) reads and writes; all tensors on one CUDA device,
// in the compute dtype (float32/float64) unless said otherwise. Column order: perm order.
struct EngineTensors {
  at::Tensor Tw;        // (d_out, d) targets, updated in place
  at::Tensor W0;        // (d_out, d) original weights (from_original) or undefined
  at::Tensor Wc;        // (d_out, d) original weights in the original order (static groups)
  at::Tensor U;         // (k, d)
  at::Tensor perm;      // (d) int64
  at::Tensor scales;    // (G, d_out)
  at::Tensor zeros;     // (G, d_out)
  at::Tensor codes;     // (d_out, d) uint8
  at::Tensor Q;         // (d_out, d)
  at::Tensor row_loss;  // (d_out), zero on entry
  at::Tensor clipped;   // (d_out) int64, zero on entry: targets whose code was clamped
};

struct EngineParams {
  int64_t gsz, bits, block_size;
  bool from_original, sym, mse, static_groups;
};

void gptq_engine_cuda(const EngineTensors& t, const EngineParams& p);

// Sparse-sign sketch: Y (m, d) += S X for X (N, d) float64, S's column t drawn from
// (seed, offset + t) by sketch_hash, zeta entries ±1/√zeta (same draws as the CPU op).
void sketch_sparse_cuda(at::Tensor& Y, const at::Tensor& X, uint64_t seed, int64_t offset, int64_t zeta);

// Gaussian sketch: Y (m, d) += S X with S[r, t] = sketch_normal(seed, offset + t, r)/√m (the CPU
// op's S), generated inside the product's tiles: S is never stored.
void sketch_gaussian_cuda(at::Tensor& Y, const at::Tensor& X, uint64_t seed, int64_t offset);

// Quantized matmul: X (M, d) float32 contiguous times the dequantized weight's transpose, (M, d_out)
// float32; S float32 (G, d_out); qweight, qzeros, g_idx contiguous int32 on X's device, checked
// by the caller (csrc/qmatmul.cpp).
at::Tensor qmatmul_cuda(const at::Tensor& X, const at::Tensor& qweight, const at::Tensor& qzeros,
                        const at::Tensor& S, const at::Tensor& g_idx, int64_t bits, int64_t zero_offset);

}  // namespace lrgptq
