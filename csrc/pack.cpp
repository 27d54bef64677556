// Packing ops for the GPTQ checkpoint layout (docs/design.md §9, rule in bitpack.h).
//   pack_bits(values, bits, dim):      integer values in 0..2^bits−1 -> int32 words along `dim`
//   unpack_bits(packed, bits, dim, n): the inverse, n values along `dim`, as uint8
// qweight packs the codes transposed to (d, d_out) along dim 0 (the input dimension);
// qzeros packs the (G, d_out) zero points along dim 1 (the output dimension).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bitpack.h"

namespace lrgptq {
namespace {

void check_bits_dim(int64_t bits, int64_t dim, const char* op) {
  TORCH_CHECK(valid_bits(bits), "lrgptq.", op, ": bits must be 2, 3, 4 or 8 (the widths the GPTQ layout defines), got ",
              bits);
  TORCH_CHECK(dim == 0 || dim == 1, "lrgptq.", op, ": dim must be 0 (qweight: along the inputs) or 1 (qzeros: along ",
              "the outputs), got ", dim);
}

// Packs the columns of V (n, m): column c becomes a stream of n values in words (·, c).
template <typename T>
void pack_columns(const at::Tensor& V, at::Tensor& P, int64_t bits) {
  const int64_t n = V.size(0), m = V.size(1);
  const T* v = V.data_ptr<T>();
  int32_t* p = P.data_ptr<int32_t>();
  at::parallel_for(0, m, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = c0; c < c1; ++c) stream_put(p + c, m, i, bits, static_cast<uint32_t>(v[i * m + c]));
  });
}

at::Tensor pack_bits(const at::Tensor& values, int64_t bits, int64_t dim) {
  check_bits_dim(bits, dim, "pack_bits");
  TORCH_CHECK(values.dim() == 2, "lrgptq.pack_bits: values must be 2-D, got shape ", values.sizes());
  TORCH_CHECK(at::isIntegralType(values.scalar_type(), /*includeBool=*/false),
              "lrgptq.pack_bits: values must be an integer tensor (uint8/int32/int64), got ", values.scalar_type(),
              "; round float codes and zero points to integers first");
  const int64_t maxq = (int64_t{1} << bits) - 1;
  if (values.numel() > 0) {
    const int64_t lo = values.min().item<int64_t>(), hi = values.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= maxq, "lrgptq.pack_bits: values must lie in 0..", maxq, " for ", bits,
                " bits, found the range ", lo, "..", hi,
                " (a GPTQ v1 zero point z−1 = −1 comes from an asymmetric z = 0: write checkpoint_format gptq_v2)");
  }
  // Work on the stream dimension first: (n, m) with the packed dimension as rows.
  at::Tensor V = (dim == 0 ? values : values.t()).contiguous();
  at::Tensor P = at::zeros({packed_words(V.size(0), bits), V.size(1)}, values.options().dtype(at::kInt));
  AT_DISPATCH_INTEGRAL_TYPES(V.scalar_type(), "pack_bits", [&] { pack_columns<scalar_t>(V, P, bits); });
  return dim == 0 ? P : P.t().contiguous();
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t dim, int64_t n) {
  check_bits_dim(bits, dim, "unpack_bits");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kInt,
              "lrgptq.unpack_bits: packed must be a 2-D int32 tensor, got ", packed.scalar_type(), " of shape ",
              packed.sizes());
  TORCH_CHECK(n >= 0 && packed.size(dim) == packed_words(n, bits), "lrgptq.unpack_bits: ", n, " values of ", bits,
              " bits take ", packed_words(std::max<int64_t>(n, 0), bits), " words along dim ", dim,
              ", but packed has shape ", packed.sizes());
  at::Tensor P = (dim == 0 ? packed : packed.t()).contiguous();
  const int64_t m = P.size(1);
  at::Tensor V = at::empty({n, m}, packed.options().dtype(at::kByte));
  const int32_t* p = P.data_ptr<int32_t>();
  uint8_t* v = V.data_ptr<uint8_t>();
  at::parallel_for(0, m, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = c0; c < c1; ++c) v[i * m + c] = static_cast<uint8_t>(stream_get(p + c, m, i, bits));
  });
  return dim == 0 ? V : V.t().contiguous();
}

at::Tensor pack_bits_meta(const at::Tensor& values, int64_t bits, int64_t dim) {
  check_bits_dim(bits, dim, "pack_bits");
  auto sizes = values.sizes().vec();
  sizes[dim] = packed_words(sizes[dim], bits);
  return at::empty(sizes, values.options().dtype(at::kInt));
}

at::Tensor unpack_bits_meta(const at::Tensor& packed, int64_t bits, int64_t dim, int64_t n) {
  check_bits_dim(bits, dim, "unpack_bits");
  auto sizes = packed.sizes().vec();
  sizes[dim] = n;
  return at::empty(sizes, packed.options().dtype(at::kByte));
}

#ifdef LRGPTQ_WITH_CUDA
// Packing runs once per layer at save/load time: on CUDA tensors it is done on the CPU and the
// result moved back (no kernel of its own).
at::Tensor pack_bits_cuda(const at::Tensor& values, int64_t bits, int64_t dim) {
  return pack_bits(values.cpu(), bits, dim).to(values.device());
}
at::Tensor unpack_bits_cuda(const at::Tensor& packed, int64_t bits, int64_t dim, int64_t n) {
  return unpack_bits(packed.cpu(), bits, dim, n).to(packed.device());
}
#endif

}  // namespace

#ifdef LRGPTQ_WITH_CUDA
TORCH_LIBRARY_IMPL(lrgptq, CUDA, m) {
  m.impl("pack_bits", &pack_bits_cuda);
  m.impl("unpack_bits", &unpack_bits_cuda);
}
#endif
TORCH_LIBRARY_IMPL(lrgptq, CPU, m) {
  m.impl("pack_bits", &pack_bits);
  m.impl("unpack_bits", &unpack_bits);
}
TORCH_LIBRARY_IMPL(lrgptq, Meta, m) {
  m.impl("pack_bits", &pack_bits_meta);
  m.impl("unpack_bits", &unpack_bits_meta);
}

}  // namespace lrgptq
