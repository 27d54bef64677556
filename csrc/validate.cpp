// damp='auto' (docs/design.md §13): the held-out loss of a candidate's quantized rows.
//   row_loss_i = ‖A e_i‖² with e_i = w_i − q_i, for A = R_val (source 'qr': AᵀA = H_val),
//   or e_iᵀ H_val e_i for A = H_val (source 'gram'); Σ_i row_loss_i = tr(E H_val Eᵀ).
// Computed in float64 whatever the dtypes of W and Q.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace lrgptq {
namespace {

void check_args(const at::Tensor& W, const at::Tensor& Q, const at::Tensor& A, c10::string_view source) {
  TORCH_CHECK(source == "qr" || source == "gram", "lrgptq.heldout_loss: source must be 'qr' or 'gram', got '",
              source, "'");
  TORCH_CHECK(W.dim() == 2, "lrgptq.heldout_loss: W must be 2-D (rows, d), got shape ", W.sizes());
  TORCH_CHECK(Q.sizes() == W.sizes(), "lrgptq.heldout_loss: Q must have W's shape ", W.sizes(), ", got ", Q.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == W.size(1) && A.size(1) == W.size(1),
              "lrgptq.heldout_loss: the held-out state A must be (d, d) with d = ", W.size(1), ", got ", A.sizes());
}

at::Tensor heldout_loss(const at::Tensor& W, const at::Tensor& Q, const at::Tensor& A, c10::string_view source) {
  check_args(W, Q, A, source);
  check_float(W, "heldout_loss", "W");
  check_float(Q, "heldout_loss", "Q");
  check_float(A, "heldout_loss", "A");
  const at::Tensor E = W.to(at::kDouble) - Q.to(at::kDouble);
  const at::Tensor S = A.to(at::kDouble);
  if (source == "qr") return at::matmul(E, S.t()).square_().sum(1);  // ‖R_val e_i‖²
  return (at::matmul(E, S) * E).sum(1);                                // e_iᵀ H_val e_i
}

at::Tensor heldout_loss_meta(const at::Tensor& W, const at::Tensor& Q, const at::Tensor& A,
                             c10::string_view source) {
  check_args(W, Q, A, source);
  return at::empty({W.size(0)}, W.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrgptq, CPU, m) { m.impl("heldout_loss", &heldout_loss); }
#ifdef LRGPTQ_WITH_CUDA
TORCH_LIBRARY_IMPL(lrgptq, CUDA, m) { m.impl("heldout_loss", &heldout_loss); }  // ATen ops: the same function
#endif
TORCH_LIBRARY_IMPL(lrgptq, Meta, m) { m.impl("heldout_loss", &heldout_loss_meta); }

}  // namespace lrgptq
