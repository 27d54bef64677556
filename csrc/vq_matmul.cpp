// VQ inference on the CPU: y = x · Wᵀ + bias for a GPTVQ layer (docs/design.md §5), never holding the
// whole float weight. In perm order, vector v of row n (columns perm[v·D .. v·D + D)) is
//   W[n, perm[v·D + a]] = s[cg, rg] · C8[cg, rg, codes[n, v], a],   cg = v·D / gc,  rg = n / gr:
// a codebook lookup. Strips of output rows are dequantized into float32 (exact: s is a float16
// number, C8 an int8) in the original column order and multiplied with the BLAS GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"

namespace lrgptq {
namespace {

constexpr int64_t kStripBytes = 1 << 20;  // a strip of float weights: 1 MiB, in L2

template <typename code_t>
void dequant_strip(const code_t* codes, const int8_t* C8, const float* S, const int64_t* perm, int64_t r0,
                   int64_t r1, int64_t d, int64_t D, int64_t K, int64_t gc, int64_t gr, int64_t Gr, float* out) {
  const int64_t nv = d / D;
  at::parallel_for(r0, r1, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t n = a0; n < a1; ++n) {
      float* w = out + (n - r0) * d;
      const int64_t rg = n / gr;
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t cb = ((v * D) / gc) * Gr + rg;
        const int8_t* c = C8 + (cb * K + static_cast<int64_t>(codes[n * nv + v])) * D;
        const float s = S[cb];
        for (int64_t a = 0; a < D; ++a) w[perm[v * D + a]] = s * static_cast<float>(c[a]);
      }
    }
  });
}

at::Tensor vq_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                     const at::Tensor& scales, const at::Tensor& perm, int64_t group_cols, int64_t group_rows,
                     const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lrgptq.vq_matmul";
  TORCH_CHECK(codebooks.dim() == 4 && codebooks.scalar_type() == at::kChar, op,
              ": codebooks must be int8 (column groups, row groups, K, dim), got ", codebooks.scalar_type(), " ",
              codebooks.sizes());
  const int64_t Gc = codebooks.size(0), Gr = codebooks.size(1), K = codebooks.size(2), D = codebooks.size(3);
  TORCH_CHECK(codes.dim() == 2 && (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort ||
                                   codes.scalar_type() == at::kInt),
              op, ": codes must be a 2-D uint8/int16/int32 tensor (out_features, in_features/dim), got ",
              codes.scalar_type(), " ", codes.sizes());
  const int64_t d_out = codes.size(0), d = codes.size(1) * D;
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == d, op, ": perm must have in_features = ", d, " entries, got ",
              perm.sizes());
  const int64_t gc = group_cols == -1 ? std::max<int64_t>(d, D) : group_cols;
  const int64_t gr = group_rows == -1 ? std::max<int64_t>(d_out, 1) : group_rows;
  TORCH_CHECK(gc > 0 && gc % D == 0 && gr > 0 && (d + gc - 1) / gc == Gc && (d_out + gr - 1) / gr == Gr, op,
              ": group_cols=", group_cols, " group_rows=", group_rows, " do not match codebooks of shape ",
              codebooks.sizes(), " for a ", d_out, "x", d, " layer");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == Gc && scales.size(1) == Gr, op,
              ": codebook_scales must be (", Gc, ", ", Gr, "), got ", scales.sizes());
  check_float(scales, "vq_matmul", "codebook_scales");
  check_float(x, "vq_matmul", "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d, op, ": x must have shape (..., ", d, "), got ", x.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == d_out), op, ": bias must have ", d_out, " entries");
  at::Tensor codes_i = codes.scalar_type() == at::kByte ? codes.contiguous() : codes.to(at::kInt).contiguous();
  TORCH_CHECK(codes_i.numel() == 0 || (codes_i.min().item<int64_t>() >= 0 && codes_i.max().item<int64_t>() < K),
              op, ": codes must lie in 0..", K - 1, " (K centroids)");
  at::Tensor P = perm.to(at::kLong).contiguous();
  TORCH_CHECK(d == 0 || at::equal(std::get<0>(at::sort(P)), at::arange(d, P.options())), op,
              ": perm must be a permutation of 0..", d - 1);

  at::Tensor x2 = x.reshape({-1, d}).to(at::kFloat).contiguous();
  at::Tensor C8 = codebooks.contiguous();
  at::Tensor S = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x2.size(0), d_out}, x2.options());
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(d_out, kStripBytes / (4 * std::max<int64_t>(d, 1))));
  at::Tensor strip = at::empty({rows, d}, x2.options());
  for (int64_t r0 = 0; r0 < d_out; r0 += rows) {
    const int64_t r1 = std::min(r0 + rows, d_out);
    if (codes_i.scalar_type() == at::kByte)
      dequant_strip(codes_i.data_ptr<uint8_t>(), C8.data_ptr<int8_t>(), S.data_ptr<float>(), P.data_ptr<int64_t>(),
                    r0, r1, d, D, K, gc, gr, Gr, strip.data_ptr<float>());
    else
      dequant_strip(codes_i.data_ptr<int32_t>(), C8.data_ptr<int8_t>(), S.data_ptr<float>(), P.data_ptr<int64_t>(),
                    r0, r1, d, D, K, gc, gr, Gr, strip.data_ptr<float>());
    at::Tensor ys = y.narrow(1, r0, r1 - r0);
    ys.copy_(at::mm(x2, strip.narrow(0, 0, r1 - r0).t()));
  }
  if (bias) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d_out;
  return y.view(shape).to(x.scalar_type());
}

// Shapes only, so torch.compile can trace callers.
at::Tensor vq_matmul_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = codes.size(0);
  return at::empty(shape, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) { m.impl("vq_matmul", &vq_matmul); }
TORCH_LIBRARY_IMPL(lrgptq, Meta, m) { m.impl("vq_matmul", &vq_matmul_meta); }

}  // namespace lrgptq
