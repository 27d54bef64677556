// The Python extension module. Loading it runs the TORCH_LIBRARY registrations, which make the
// ops reachable as torch.ops.lrgptq.*; the module itself reports how it was built and exposes
// one internal kernel to its accuracy test (_pow_2_4).
#include <torch/extension.h>

#include "mse_search.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lrgptq C++ core: importing registers torch.ops.lrgptq";
#ifdef LRGPTQ_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("_pow_2_4", [](const at::Tensor& e) {  // e^2.4 as the CPU MSE search computes it
    TORCH_CHECK(e.device().is_cpu() && (e.scalar_type() == at::kFloat || e.scalar_type() == at::kDouble),
                "_pow_2_4: a CPU float32 or float64 tensor");
    const at::Tensor x = e.contiguous();
    at::Tensor out = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_pow_2_4", [&] {
      lrgptq::pow_2_4(x.data_ptr<scalar_t>(), x.numel(), out.data_ptr<scalar_t>());
    });
    return out;
  });
}
