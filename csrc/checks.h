// Input validation shared by the kernels: errors name the op, the tensor and the fix.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lrgptq {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "lrgptq.", op, ": ", name,
              " must be a floating-point tensor (float64/float32/float16/bfloat16), got ",
              t.scalar_type());
}

// The error for a tensor with NaN or Inf values (finite: what the caller found).
inline void check_finite_found(bool finite, const char* op, const char* name) {
  TORCH_CHECK(finite, "lrgptq.", op, ": ", name, " contains NaN or Inf; clean the ", name,
              " (e.g. check the calibration data or the model's dtype overflow) before quantizing");
}

// Whether x[0..n) are all finite: a value is NaN or Inf exactly when its exponent bits are all
// ones, an integer test the compiler vectorises (std::isfinite is a branch per value).
template <typename T>
inline bool finite_span(const T* x, int64_t n) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  constexpr Bits exp_mask = sizeof(T) == 8 ? Bits(0x7ff0000000000000ull) : Bits(0x7f800000u);
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, x + i, sizeof(T));
    bad |= static_cast<Bits>((b & exp_mask) == exp_mask);
  }
  return bad == 0;
}

// One parallel pass over a contiguous float32/float64 CPU tensor; ATen's reduction otherwise.
inline bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const bool plain = t.device().is_cpu() && t.is_contiguous() &&
                     (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
  if (!plain) return at::isfinite(t).all().item<bool>();
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "all_finite", [&] {
    const scalar_t* x = t.data_ptr<scalar_t>();
    at::parallel_for(0, t.numel(), int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
      if (!finite_span(x + i0, i1 - i0)) finite = false;
    });
  });
  return finite;
}

inline void check_finite(const at::Tensor& t, const char* op, const char* name) {
  check_finite_found(all_finite(t), op, name);
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
