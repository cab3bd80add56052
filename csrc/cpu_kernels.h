// The interface between the ops (log_softmax.cpp, built with the portable flags) and the row
// kernels, which are compiled once per instruction set (kernels_baseline.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp, each a copy of row_math.h in its own namespace) and chosen at run time by
// select_kernels(). Plain C++ only: no ATen here, so that no inline function of a torch header is
// ever compiled for a wider instruction set than the CPU that runs the baseline code.
#pragma once

#include <cstdint>
#include <string>

namespace grpo_fused_cpp {

// Element types of the logits; the 16-bit ones have the layout of c10::BFloat16 / c10::Half.
enum class Elem : int { kFloat, kDouble, kBFloat16, kHalf };

// A (B, T, V) or (N, V) tensor with unit stride over V, seen as rows r = b * T + t.
struct RowLayout {
  int64_t rows, inner, vocab, stride_outer, stride_inner;
  // int64 offsets: N * V can exceed 2^31.
  int64_t offset(int64_t r) const {
    const int64_t outer = inner > 0 ? r / inner : 0;
    return outer * stride_outer + (r - outer * inner) * stride_inner;
  }
};

// The sampler's truncation (grpo_fused.semantics.SamplingRule) as the params slots hold it; each
// stage is off at its neutral value.
struct SamplingNumbers {
  int64_t top_k;     // keep the top_k most probable tokens; 0: off
  double top_p;      // keep the most probable prefix of mass top_p; 1: off
  double log_min_p;  // keep z - max z >= log_min_p; -inf: off
  bool top_k_all_ties;  // top-k keeps every token tied with the k-th (else exactly k, lowest ids first)
};

// A sampling support's cutoff per row, (rows, 2) float64: [tau, tie_end]. Token v of the row is kept
// when z[v] > tau, or z[v] == tau and v < tie_end (sampling_support.h finds it; tau is an exact
// float / double value and tie_end an integer, both exact in float64). tau = NaN marks a row with a
// NaN logit (nothing kept, NaN outputs).
constexpr int kCutoffFields = 2;

// Per-row outputs / inputs are contiguous (rows,) vectors of the accumulation type: float, or
// double for double logits. `ids` are already checked to lie in [0, vocab).
struct ForwardJob {
  Elem elem;
  const void* logits;
  RowLayout layout;
  const int64_t* ids;
  double scale;  // 1 / temperature, > 0
  bool entropy;  // also fill `entropy_out`
  void* logps;
  void* lse;
  void* entropy_out;
  // Sampling support (null: the softmax of every token): find each row's cutoff, write it to
  // `cutoff`, and run the softmax over the kept tokens only.
  const SamplingNumbers* sampling = nullptr;
  double* cutoff = nullptr;
};

// dlogits_j = dz_j * scale with dz_j = g_logp * (1[j == id] - p_j) - g_entropy * p_j * (logp_j + H).
// `dlogits` may be `logits` itself (same layout): each row is read before it is written.
struct BackwardJob {
  Elem elem;
  const void* logits;
  RowLayout layout;
  void* dlogits;
  RowLayout out_layout;
  const int64_t* ids;
  double scale;
  const void* lse;
  const void* entropy;       // null when grad_entropy is null
  const void* grad_logps;
  const void* grad_entropy;  // null: no entropy term
  const double* cutoff = nullptr;  // (rows, 2) from the forward: zero gradient at dropped tokens; null: none
};

// One instruction set's kernels. Each call handles rows [begin, end); the caller splits the rows
// between threads.
struct CpuKernels {
  const char* name;  // "baseline", "avx2", "avx512"
  void (*forward)(const ForwardJob& job, int64_t begin, int64_t end);
  void (*backward)(const BackwardJob& job, int64_t begin, int64_t end);
};

// Each returns null when that variant was not compiled (another architecture, another compiler).
const CpuKernels* kernels_baseline();
const CpuKernels* kernels_avx2();
const CpuKernels* kernels_avx512();

// The variant the ops use now: the widest this CPU supports, capped by the environment variable
// GRPO_FUSED_CPU_CAPABILITY (baseline | avx2 | avx512), read on every call so tests can switch.
const CpuKernels& select_kernels();

// Name of the variant select_kernels() returns (the `cpu_capability` op).
std::string cpu_capability();

}  // namespace grpo_fused_cpp
