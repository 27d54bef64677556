// Hot loops written to auto-vectorise are built for AVX-512 and AVX2 too, and the loader picks the
// widest the CPU has (the default build targets baseline x86-64 only).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LRGPTQ_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define LRGPTQ_CLONES
#endif
// For a hot loop's body written once as a template and called from the clones: inlined into each,
// so each clone compiles it for its own instruction set (a call would run the baseline build).
#if defined(__GNUC__)
#define LRGPTQ_INLINE __attribute__((always_inline)) inline
#else
#define LRGPTQ_INLINE inline
#endif
// For a clone whose body calls small helpers from shared headers (the quantizer's): every call in
// it is inlined, so the whole body is compiled (and vectorised) for the clone's instruction set.
#if defined(__GNUC__)
#define LRGPTQ_FLATTEN __attribute__((flatten))
#else
#define LRGPTQ_FLATTEN
#endif
