// The one list of lrgptq's operator schemas. Kernels register themselves per
// dispatch key in the file that implements them (TORCH_LIBRARY_IMPL).
#include <torch/library.h>

TORCH_LIBRARY(lrgptq, m) {
  // Accumulators (docs/design.md §2): update a state in place from a batch X (..., d).
  m.def("gram_update(Tensor(a!) H, Tensor X) -> ()");
  m.def("qr_update(Tensor(a!) R, Tensor X) -> ()");
  m.def("sketch_update(Tensor(a!) Y, Tensor X, int seed, int offset, str kind, int zeta) -> ()");

  // Factor routes (docs/design.md §3): accumulator state -> column order and engine-ready factor.
  // force_spectrum: svdqr computes the spectrum even where truncation provably keeps everything.
  m.def(
      "factor(Tensor A, str source, str route, str order, float damp, str damp_ref, "
      "int max_retries, str truncation, float tau, ScalarType dtype, bool force_spectrum=False) "
      "-> (Tensor perm, Tensor U, int rank, Tensor dead, float damp_lambda, int damp_retries, "
      "float sigma_max, float sigma_min_kept, bool from_original, int pivots)");

  // damp='auto' (docs/design.md §13): per row, the held-out loss ‖A (w − q)‖² (source 'qr', A = R_val)
  // or (w − q)ᵀ A (w − q) (source 'gram', A = H_val), float64.
  m.def("heldout_loss(Tensor W, Tensor Q, Tensor A, str source) -> Tensor");

  // The GPTQ engine (docs/design.md §4) on the uniform grid: scalar GPTQ (ldlq_dim = 1) or block LDLQ
  // (ldlq_dim = D columns chosen jointly, docs/design.md §5); grid 'minmax' (min-max or MSE range) or
  // 'noclip' (passes until no target is clamped, at most grid_passes); row_clipped counts the
  // clamped targets per row; grid_passes (1 value) the passes run.
  m.def(
      "gptq_quantize(Tensor W, Tensor perm, Tensor U, bool from_original, int bits, "
      "int group_size, bool sym, bool mse, bool static_groups, int block_size, int ldlq_dim=1, "
      "str grid=\"minmax\", int grid_passes=4) "
      "-> (Tensor codes, Tensor scales, Tensor zeros, Tensor g_idx, Tensor Q, Tensor row_loss, "
      "Tensor row_clipped, Tensor grid_passes)");

  // The GPTQ checkpoint layout (docs/design.md §9): integer values <-> int32 words along a dimension.
  m.def("pack_bits(Tensor values, int bits, int dim) -> Tensor");
  m.def("unpack_bits(Tensor packed, int bits, int dim, int n) -> Tensor");

  // Quantized inference: y = x · dequant(qweight)ᵀ + bias, dequantized tile by tile.
  // zero_offset: 1 for checkpoint_format gptq (v1 stores z − 1), 0 for gptq_v2.
  m.def(
      "qmatmul(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, "
      "int zero_offset, Tensor? bias) -> Tensor");

  // GPTVQ (docs/design.md §5): D-dimensional codebooks per (column group × row group), EM-fitted,
  // with the error-feedback loop on the D×D diagonal blocks of U. codes (d_out, d/dim) and Q's
  // columns are in perm order; Q comes back in the original column order.
  m.def(
      "vq_quantize(Tensor W, Tensor perm, Tensor U, bool from_original, int dim, int bits, "
      "int group_cols, int group_rows, int em_iters, bool codebook_int8, Tensor? codebooks, int block_size) "
      "-> (Tensor codes, Tensor codebooks, Tensor codebook_scales, Tensor Q, Tensor row_loss, Tensor em_trace)");
  // VQ inference: y = x · Wᵀ + bias, W[:, perm] = scales · codebooks8[codes] looked up strip by strip.
  m.def(
      "vq_matmul(Tensor x, Tensor codes, Tensor codebooks, Tensor codebook_scales, Tensor perm, "
      "int group_cols, int group_rows, Tensor? bias) -> Tensor");
}
