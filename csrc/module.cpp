// The Python extension module. Loading it runs the TORCH_LIBRARY registrations, which make the
// ops reachable as torch.ops.lrgptq.*; the module itself only reports how it was built.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "lrgptq C++ core: importing registers torch.ops.lrgptq";
#ifdef LRGPTQ_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
