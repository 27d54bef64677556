// Hot loops written to auto-vectorise are built for AVX-512 and AVX2 too, and the loader picks the
// widest the CPU has (the default build targets baseline x86-64 only).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LRGPTQ_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define LRGPTQ_CLONES
#endif
