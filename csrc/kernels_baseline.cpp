// The row kernels for any CPU of the target architecture: compiled with the build's portable flags
// (x86-64: SSE2; AArch64: NEON), 4-float vectors, the native width of both. (8-float vectors as
// pairs of SSE instructions measured 10x slower: GCC scalarizes their compares and selects.)
// See row_math.h and cpu_kernels.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__SSE2__)
#include <emmintrin.h>  // SSE2 is part of x86-64: MAXPS / MINPS need no target switch
#endif

#include "cpu_kernels.h"

#define GRPO_FUSED_ISA baseline
#define GRPO_FUSED_VEC_BYTES 16
#define GRPO_FUSED_WITH_DOUBLE 1  // the float64 path lives here only
#include "row_math.h"

namespace grpo_fused_cpp {

const CpuKernels* kernels_baseline() {
  static const CpuKernels table{"baseline", &baseline::forward, &baseline::backward};
  return &table;
}

}  // namespace grpo_fused_cpp
