// LRGPTQ_HD marks math shared by the CPU kernels and the CUDA kernels (__host__ __device__
// under nvcc, nothing under a plain C++ compiler), so both devices run the same formulas.
#pragma once
#ifdef __CUDACC__
#define LRGPTQ_HD __host__ __device__
#else
#define LRGPTQ_HD
#endif
