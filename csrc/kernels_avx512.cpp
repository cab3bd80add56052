// The row kernels compiled for AVX-512 (F, BW, DQ, VL: Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and
// later), 16-float vectors.
// Only this file is compiled for those instructions (#pragma GCC target below, after every
// #include), so the library still loads and runs on any x86-64 CPU; select_kernels() calls it
// only when the CPU has them. See row_math.h and cpu_kernels.h.
#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif

#define GRPO_FUSED_ISA avx512
#define GRPO_FUSED_VEC_BYTES 64
#define GRPO_FUSED_FMA 1
#define GRPO_FUSED_F16C 1
#include "row_math.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace grpo_fused_cpp {
const CpuKernels* kernels_avx512() {
  static const CpuKernels table{"avx512", &avx512::forward, &avx512::backward};
  return &table;
}
}  // namespace grpo_fused_cpp

#else
namespace grpo_fused_cpp {
const CpuKernels* kernels_avx512() { return nullptr; }
}  // namespace grpo_fused_cpp
#endif
