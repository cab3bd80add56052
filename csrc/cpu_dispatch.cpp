// Run-time choice of the row kernels: the widest variant this CPU supports (kernels_avx512.cpp,
// kernels_avx2.cpp, kernels_baseline.cpp), so that one build, a wheel or `pip install
// --no-build-isolation` or the just-in-time build alike, runs the fastest code the CPU has.
// GRPO_FUSED_CPU_CAPABILITY=baseline|avx2|avx512 caps the choice (tests compare the variants;
// PyTorch's ATEN_CPU_CAPABILITY works the same way). It is read on every op call (one getenv).
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_kernels.h"

namespace grpo_fused_cpp {
namespace {

// The variants from widest to narrowest, with what the CPU must have for each.
enum Level { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Level cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Level level = [] {
    __builtin_cpu_init();
    // __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV).
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (avx512 && kernels_avx512() != nullptr) return kAvx512;
    if (avx2 && kernels_avx2() != nullptr) return kAvx2;
    return kBaseline;
  }();
  return level;
#else
  return kBaseline;
#endif
}

Level requested_level() {
  const char* env = std::getenv("GRPO_FUSED_CPU_CAPABILITY");
  if (env == nullptr || env[0] == '\0') return kAvx512;
  if (std::strcmp(env, "avx512") == 0) return kAvx512;
  if (std::strcmp(env, "avx2") == 0) return kAvx2;
  if (std::strcmp(env, "baseline") == 0 || std::strcmp(env, "default") == 0) return kBaseline;
  TORCH_CHECK(false, "GRPO_FUSED_CPU_CAPABILITY must be baseline, avx2 or avx512 (or unset), got '", env, "'");
}

}  // namespace

const CpuKernels& select_kernels() {
  const Level want = requested_level();
  const Level level = want < cpu_level() ? want : cpu_level();
  if (level == kAvx512) return *kernels_avx512();
  if (level == kAvx2) return *kernels_avx2();
  return *kernels_baseline();
}

std::string cpu_capability() { return select_kernels().name; }

}  // namespace grpo_fused_cpp
