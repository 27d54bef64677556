// LRGPTQ_HD marks math shared by the CPU kernels and the CUDA kernels (__host__ __device__
// under nvcc, nothing under a plain C++ compiler), so both devices run the same formulas.
// LRGPTQ_HD_INLINE also forces inlining, for the quantizer's one-line steps: a call left in a
// loop keeps the compiler from vectorising it (and a call from an instruction-set clone would
// run the baseline build).
#pragma once
#ifdef __CUDACC__
#define LRGPTQ_HD __host__ __device__
#define LRGPTQ_HD_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LRGPTQ_HD
#define LRGPTQ_HD_INLINE __attribute__((always_inline)) inline
#else
#define LRGPTQ_HD
#define LRGPTQ_HD_INLINE inline
#endif
