// The GPTQ bit-packing rule (docs/design.md §9), shared by the packing ops and the quantized matmul.
//
// n values of `bits` bits each are laid out as one little-endian bit stream cut into int32
// words: value i occupies stream bits [i·bits, (i+1)·bits), word w holds stream bits
// [32w, 32w + 32), least-significant bit first. For 2, 4 and 8 bits a word holds exactly
// 32/bits whole values. For 3 bits, 32 values fill 3 words and values 10 and 21 straddle a word
// boundary (bits 30..32 and 63..65 of the stream). A stream of n values takes ceil(n·bits/32)
// words; when 32 does not divide n·bits the unused high bits of the last word are zero (the
// ceil rule of GPTQModel's buffers; AutoGPTQ's n/32·bits agrees whenever 32 | n).
#pragma once
#include <cstdint>

#include "hd.h"

namespace lrgptq {

LRGPTQ_HD inline bool valid_bits(int64_t bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

// Words that hold n values of `bits` bits.
LRGPTQ_HD inline int64_t packed_words(int64_t n, int64_t bits) { return (n * bits + 31) / 32; }

// Value i of a stream, from its words (word w of the stream at words[w * stride]).
LRGPTQ_HD inline uint32_t stream_get(const int32_t* words, int64_t stride, int64_t i, int64_t bits) {
  const int64_t off = i * bits, w = off >> 5, sh = off & 31;
  const uint32_t mask = (1u << bits) - 1;
  uint32_t v = static_cast<uint32_t>(words[w * stride]) >> sh;
  if (sh + bits > 32) v |= static_cast<uint32_t>(words[(w + 1) * stride]) << (32 - sh);  // straddles
  return v & mask;
}

// ORs value v (< 2^bits) into its place in the stream; the words start at zero.
inline void stream_put(int32_t* words, int64_t stride, int64_t i, int64_t bits, uint32_t v) {
  const int64_t off = i * bits, w = off >> 5, sh = off & 31;
  words[w * stride] = static_cast<int32_t>(static_cast<uint32_t>(words[w * stride]) | (v << sh));
  if (sh + bits > 32)  // the high bits of a straddling value start the next word
    words[(w + 1) * stride] =
        static_cast<int32_t>(static_cast<uint32_t>(words[(w + 1) * stride]) | (v >> (32 - sh)));
}

}  // namespace lrgptq
