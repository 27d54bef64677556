// Input validation shared by the kernels: errors name the op, the tensor and the fix.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lrgptq {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "lrgptq.", op, ": ", name,
              " must be a floating-point tensor (float64/float32/float16/bfloat16), got ",
              t.scalar_type());
}

inline void check_finite(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 0 || at::isfinite(t).all().item<bool>(), "lrgptq.", op, ": ", name,
              " contains NaN or Inf; clean the ", name,
              " (e.g. check the calibration data or the model's dtype overflow) before quantizing");
}

inline void check_state(const at::Tensor& S, const char* op, const char* name, int64_t cols) {
  TORCH_CHECK(S.dim() == 2 && S.size(1) == cols, "lrgptq.", op, ": ", name,
              " must be a 2-D state with ", cols, " columns, got shape ", S.sizes());
  TORCH_CHECK(S.scalar_type() == at::kDouble || S.scalar_type() == at::kFloat, "lrgptq.", op,
              ": ", name, " must be float64 or float32, got ", S.scalar_type());
  TORCH_CHECK(S.is_contiguous(), "lrgptq.", op, ": ", name, " must be contiguous");
}

// (..., d) -> (N, d) in the state's dtype.
inline at::Tensor as_rows(const at::Tensor& X, int64_t d, at::ScalarType dtype, const char* op) {
  check_float(X, op, "X");
  TORCH_CHECK(X.dim() >= 1 && X.size(-1) == d, "lrgptq.", op, ": X must have shape (..., ", d,
              ") to match the state, got ", X.sizes());
  at::Tensor Xr = X.reshape({-1, d}).to(dtype);
  check_finite(Xr, op, "X");
  return Xr;
}

}  // namespace lrgptq
