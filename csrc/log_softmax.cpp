// Selective log-softmax on CPU: per-token logp = z[id] - logsumexp(z) and entropy, z = logits / T,
// from logits (the "logits" ops) or from hidden states and the lm_head weight, chunk by chunk
// (the "linear" ops); the "_support" forwards score under the sampler's truncated distribution
// (sampling_support.h) and return each row's cutoff, which the backwards then take. Schemas are in
// registration.cpp; the row kernels (row_math.h) are compiled once per instruction set
// (kernels_*.cpp) and chosen at run time here (select_kernels).
// Per-operator headers instead of ATen/ATen.h: a third of the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "params.h"

namespace grpo_fused_cpp {
namespace {

using at::Tensor;

// Rows per parallel task: enough that a task is at least ~64k values of work.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1)); }

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Elem::kFloat;
    case at::kDouble: return Elem::kDouble;
    case at::kBFloat16: return Elem::kBFloat16;
    case at::kHalf: return Elem::kHalf;
    default: TORCH_CHECK(false, "logits must be float32, bfloat16, float16 or float64, got ", t);
  }
}

// A (B, T, V) or (N, V) tensor with unit stride over V, seen as rows r = b * T + t.
RowLayout row_layout(const Tensor& t) {
  RowLayout lay;
  if (t.dim() == 3) {
    lay.inner = t.size(1);
    lay.rows = t.size(0) * lay.inner;
    lay.stride_outer = t.stride(0);
    lay.stride_inner = t.stride(1);
  } else {
    lay.inner = t.size(0);
    lay.rows = lay.inner;
    lay.stride_outer = 0;
    lay.stride_inner = t.stride(0);
  }
  lay.vocab = t.size(-1);
  return lay;
}

void check_logits(const Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, name, " must be (N, V) or (B, T, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(-1) > 0, name, " must have V > 0");
  TORCH_CHECK(logits.size(-1) == 1 || logits.stride(-1) == 1, name, " must have unit stride over V, got strides ",
              logits.strides());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble ||
                  logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16, float16 or float64, got ", logits.scalar_type());
}

void check_rows(const Tensor& t, int64_t rows, const char* name, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), name, " must be contiguous (", rows,
              ",), got ", t.sizes());
  if (dtype) TORCH_CHECK(t.scalar_type() == *dtype, name, " must be ", *dtype, ", got ", t.scalar_type());
}

// One compare per row, before any kernel runs; the Python API checks ids too, but
// GRPO_FUSED_CHECK_IDS=0 skips that.
void check_ids(const int64_t* ids, int64_t rows, int64_t vocab) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ids[r] >= 0 && ids[r] < vocab, "ids must lie in [0, ", vocab, "), found ", ids[r]);
  }
}

double inv_temperature_of(const Tensor& params) {
  const double scale = param(params, kSlotInvTemperature);
  // The kernels take the max of the raw logits and scale it, which needs scale > 0.
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "params[", kSlotInvTemperature,
              "] (1 / temperature) must be finite and > 0, got ", scale);
  return scale;
}

// The sampler's truncation from the params slots (grpo_fused.semantics.sampling_slots writes them).
SamplingNumbers sampling_numbers_of(const Tensor& params, bool top_k_all_ties) {
  const double top_k = param(params, kSlotTopK);
  const double top_p = param(params, kSlotTopP);
  const double log_min_p = param(params, kSlotLogMinP);
  TORCH_CHECK(top_k >= 0 && top_k == std::floor(top_k) && top_k < 9.0e15, "params[", kSlotTopK,
              "] (top_k) must be a whole number >= 0 (0: off), got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "params[", kSlotTopP, "] (top_p) must be in (0, 1] (1: off), got ", top_p);
  TORCH_CHECK(log_min_p < 0, "params[", kSlotLogMinP, "] (log(min_p)) must be < 0 (-inf: off), got ", log_min_p);
  return {static_cast<int64_t>(top_k), top_p, log_min_p, top_k_all_ties};
}

// The cutoff of a sampling support, as the forwards return it and the backwards take it.
void check_cutoff(const Tensor& cutoff, int64_t rows) {
  TORCH_CHECK(cutoff.device().is_cpu() && cutoff.scalar_type() == at::kDouble && cutoff.dim() == 2 &&
                  cutoff.size(0) == rows && cutoff.size(1) == kCutoffFields && cutoff.is_contiguous(),
              "cutoff must be a contiguous (", rows, ", ", kCutoffFields, ") float64 CPU tensor, got ", cutoff.sizes(),
              " ", cutoff.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Logits ops.
// ---------------------------------------------------------------------------------------------

struct ForwardOutputs {
  Tensor logps, lse, entropy;
  Tensor cutoff;  // (rows, 2) float64 under a sampling support, else undefined
};

// `sampling` null: the softmax of every token.
ForwardOutputs logits_forward(const Tensor& logits, const Tensor& ids, const Tensor& params, bool compute_entropy,
                              const SamplingNumbers* sampling) {
  check_logits(logits, "logits");
  const double inv_temperature = inv_temperature_of(params);
  const RowLayout layout = row_layout(logits);
  check_rows(ids, layout.rows, "ids", at::kLong);
  const auto acc = acc_type_of(logits.scalar_type());
  auto opts = logits.options().dtype(acc);
  ForwardOutputs out{at::empty({layout.rows}, opts), at::empty({layout.rows}, opts),
                     at::empty({compute_entropy ? layout.rows : 0}, opts), Tensor()};
  if (sampling != nullptr) {
    // The support's search holds token ids in 32-bit vector lanes.
    TORCH_CHECK(layout.vocab < (int64_t{1} << 31), "a sampling support needs V < 2^31, got ", layout.vocab);
    out.cutoff = at::empty({layout.rows, kCutoffFields}, opts.dtype(at::kDouble));
  }
  if (layout.rows == 0) return out;
  check_ids(ids.const_data_ptr<int64_t>(), layout.rows, layout.vocab);
  const ForwardJob job{elem_of(logits.scalar_type()),
                       logits.const_data_ptr(),
                       layout,
                       ids.const_data_ptr<int64_t>(),
                       inv_temperature,
                       compute_entropy,
                       out.logps.mutable_data_ptr(),
                       out.lse.mutable_data_ptr(),
                       compute_entropy ? out.entropy.mutable_data_ptr() : nullptr,
                       sampling,
                       sampling != nullptr ? out.cutoff.mutable_data_ptr<double>() : nullptr};
  const CpuKernels& kernels = select_kernels();
  at::parallel_for(0, layout.rows, grain_rows(layout.vocab),
                   [&](int64_t begin, int64_t end) { kernels.forward(job, begin, end); });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> logits_fwd(const Tensor& logits, const Tensor& ids, const Tensor& params,
                                              bool compute_entropy) {
  ForwardOutputs out = logits_forward(logits, ids, params, compute_entropy, nullptr);
  return {out.logps, out.lse, out.entropy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> logits_fwd_support(const Tensor& logits, const Tensor& ids,
                                                              const Tensor& params, bool compute_entropy,
                                                              bool top_k_all_ties) {
  const SamplingNumbers sampling = sampling_numbers_of(params, top_k_all_ties);
  ForwardOutputs out = logits_forward(logits, ids, params, compute_entropy, &sampling);
  return {out.logps, out.lse, out.entropy, out.cutoff};
}

// grad_entropy may be empty (0,): the entropy was not used, its term is skipped. cutoff: the sampling
// support's, from the forward (the gradient is 0 at dropped tokens), or none.
void logits_bwd_into(const Tensor& grad_logps, const Tensor& grad_entropy, const Tensor& logits, const Tensor& ids,
                     const Tensor& lse, const Tensor& entropy, const Tensor& params,
                     const c10::optional<Tensor>& cutoff, Tensor& dlogits) {
  check_logits(logits, "logits");
  const double inv_temperature = inv_temperature_of(params);
  const RowLayout layout = row_layout(logits);
  const auto acc = acc_type_of(logits.scalar_type());
  check_rows(ids, layout.rows, "ids", at::kLong);
  check_rows(grad_logps, layout.rows, "grad_logps", acc);
  check_rows(lse, layout.rows, "lse", acc);
  const bool has_entropy_grad = grad_entropy.numel() > 0;
  if (has_entropy_grad) {
    check_rows(grad_entropy, layout.rows, "grad_entropy", acc);
    check_rows(entropy, layout.rows, "entropy", acc);
  }
  if (cutoff) check_cutoff(*cutoff, layout.rows);
  if (layout.rows == 0) return;
  check_ids(ids.const_data_ptr<int64_t>(), layout.rows, layout.vocab);
  const BackwardJob job{elem_of(logits.scalar_type()),
                        logits.const_data_ptr(),
                        layout,
                        dlogits.mutable_data_ptr(),
                        row_layout(dlogits),
                        ids.const_data_ptr<int64_t>(),
                        inv_temperature,
                        lse.const_data_ptr(),
                        has_entropy_grad ? entropy.const_data_ptr() : nullptr,
                        grad_logps.const_data_ptr(),
                        has_entropy_grad ? grad_entropy.const_data_ptr() : nullptr,
                        cutoff ? cutoff->const_data_ptr<double>() : nullptr};
  const CpuKernels& kernels = select_kernels();
  at::parallel_for(0, layout.rows, grain_rows(layout.vocab),
                   [&](int64_t begin, int64_t end) { kernels.backward(job, begin, end); });
}

// The (N, V) gradient, in transparent huge pages where the kernel hands them out on request
// (/sys/kernel/mm/transparent_hugepage/enabled = madvise, a common default; with "never" this is
// an ordinary allocation). Its first write faults every page in: with 4 KiB pages that cost more
// than the backward's arithmetic (measured on a Xeon, one thread, 262 MB of bf16 gradient: 144 ms
// for the backward into a fresh at::empty, 47 ms into already-touched memory, 80 ms into a fresh
// 2 MiB-page buffer). Up to glibc's largest dynamic mmap threshold (32 MiB on 64-bit) the ordinary
// path is faster still: once such a block has been freed, glibc serves the next one from its heap,
// already faulted in (measured, N = 256, V = 32000 fp32, a 31 MiB gradient: backward 16.6 ms in a fresh
// 2 MiB-page buffer, 2.7 ms from at::empty); above it every at::empty is a fresh mmap.
Tensor empty_gradient(const Tensor& like) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t{2} << 20;
  constexpr size_t kGlibcMmapThresholdMax = size_t{32} << 20;
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (nbytes > kGlibcMmapThresholdMax) {
    const size_t length = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, length) == 0) {
      madvise(data, length, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
      return at::from_blob(data, like.sizes(), [](void* p) { std::free(p); }, like.options());
    }
  }
#endif
  return at::empty(like.sizes(), like.options());
}

Tensor logits_bwd(const Tensor& grad_logps, const Tensor& grad_entropy, const Tensor& logits, const Tensor& ids,
                  const Tensor& lse, const Tensor& entropy, const Tensor& params, const c10::optional<Tensor>& cutoff) {
  Tensor dlogits = empty_gradient(logits);
  logits_bwd_into(grad_logps, grad_entropy, logits, ids, lse, entropy, params, cutoff, dlogits);
  return dlogits;
}

// Same as logits_bwd, but the gradient overwrites `logits` (zero extra memory).
void logits_bwd_inplace(const Tensor& grad_logps, const Tensor& grad_entropy, Tensor& logits, const Tensor& ids,
                        const Tensor& lse, const Tensor& entropy, const Tensor& params,
                        const c10::optional<Tensor>& cutoff) {
  logits_bwd_into(grad_logps, grad_entropy, logits, ids, lse, entropy, params, cutoff, logits);
}

// ---------------------------------------------------------------------------------------------
// Linear ops: logits = hidden @ weight.T + bias, `chunk_rows` tokens at a time. Only one chunk of
// logits (chunk_rows x V, fp32) exists at any moment. The GEMMs run in the compute dtype (fp32,
// or fp64 for fp64 inputs), like the reference.
// ---------------------------------------------------------------------------------------------

void check_linear(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t chunk_rows) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "hidden and weight must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be (N, H), got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "weight must be (V, ", hidden.size(1), "), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "weight must have V > 0 rows");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be (", weight.size(0), ",)");
  TORCH_CHECK(chunk_rows > 0, "chunk_rows must be > 0, got ", chunk_rows);
}

struct LinearOperands {
  Tensor weight_t;  // (H, V) view of the compute-dtype weight
  Tensor weight;    // (V, H) compute dtype
  c10::optional<Tensor> bias;
  at::ScalarType acc;
};

LinearOperands linear_operands(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias) {
  LinearOperands ops;
  ops.acc = acc_type_of(hidden.scalar_type());
  ops.weight = weight.to(ops.acc).contiguous();
  ops.weight_t = ops.weight.t();
  if (bias) ops.bias = bias->to(ops.acc);
  return ops;
}

// The chunk loop both linear ops share: operands in the compute dtype and one (chunk, V) buffer
// that each chunk's logits are written into.
struct LinearChunks {
  LinearOperands ops;
  at::TensorOptions opts;  // compute dtype
  int64_t rows, vocab, chunk;
  Tensor buffer;  // (chunk, V)

  LinearChunks(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t chunk_rows)
      : ops(linear_operands(hidden, weight, bias)),
        opts(hidden.options().dtype(ops.acc)),
        rows(hidden.size(0)),
        vocab(weight.size(0)),
        chunk(std::min(chunk_rows, std::max<int64_t>(rows, 1))),
        buffer(at::empty({chunk, vocab}, opts)) {}

  // Calls f(start, n, h, logits) per chunk of n tokens: h (n, H) the compute-dtype hidden states,
  // logits (n, V) = h @ weight.T + bias, a view of `buffer`.
  template <typename F>
  void for_each(const Tensor& hidden, F&& f) {
    for (int64_t start = 0; start < rows; start += chunk) {
      const int64_t n = std::min(chunk, rows - start);
      Tensor h = hidden.narrow(0, start, n).to(ops.acc);
      Tensor logits = buffer.narrow(0, 0, n);
      if (ops.bias) {
        at::addmm_out(logits, *ops.bias, h, ops.weight_t);
      } else {
        at::mm_out(logits, h, ops.weight_t);
      }
      f(start, n, h, logits);
    }
  }
};

// Under a sampling support each chunk's logits get their rows' cutoffs, as the logits op's would.
ForwardOutputs linear_forward(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                              const Tensor& ids, const Tensor& params, bool compute_entropy, int64_t chunk_rows,
                              const SamplingNumbers* sampling) {
  check_linear(hidden, weight, bias, chunk_rows);
  check_rows(ids, hidden.size(0), "ids", at::kLong);
  LinearChunks chunks(hidden, weight, bias, chunk_rows);
  ForwardOutputs out{at::empty({chunks.rows}, chunks.opts), at::empty({chunks.rows}, chunks.opts),
                     at::empty({compute_entropy ? chunks.rows : 0}, chunks.opts), Tensor()};
  if (sampling != nullptr) out.cutoff = at::empty({chunks.rows, kCutoffFields}, chunks.opts.dtype(at::kDouble));
  chunks.for_each(hidden, [&](int64_t start, int64_t n, const Tensor&, const Tensor& logits) {
    const ForwardOutputs chunk = logits_forward(logits, ids.narrow(0, start, n), params, compute_entropy, sampling);
    out.logps.narrow(0, start, n).copy_(chunk.logps);
    out.lse.narrow(0, start, n).copy_(chunk.lse);
    if (compute_entropy) out.entropy.narrow(0, start, n).copy_(chunk.entropy);
    if (sampling != nullptr) out.cutoff.narrow(0, start, n).copy_(chunk.cutoff);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_fwd(const Tensor& hidden, const Tensor& weight,
                                              const c10::optional<Tensor>& bias, const Tensor& ids,
                                              const Tensor& params, bool compute_entropy, int64_t chunk_rows) {
  ForwardOutputs out = linear_forward(hidden, weight, bias, ids, params, compute_entropy, chunk_rows, nullptr);
  return {out.logps, out.lse, out.entropy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_fwd_support(const Tensor& hidden, const Tensor& weight,
                                                              const c10::optional<Tensor>& bias, const Tensor& ids,
                                                              const Tensor& params, bool compute_entropy,
                                                              int64_t chunk_rows, bool top_k_all_ties) {
  const SamplingNumbers sampling = sampling_numbers_of(params, top_k_all_ties);
  ForwardOutputs out = linear_forward(hidden, weight, bias, ids, params, compute_entropy, chunk_rows, &sampling);
  return {out.logps, out.lse, out.entropy, out.cutoff};
}

// Returns (dhidden (N, H), dweight (V, H), dbias (V,)) in the input dtypes.
// dweight / dbias are skipped, and returned as (0,), when not asked for (a frozen lm_head).
std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& grad_logps, const Tensor& grad_entropy,
                                              const Tensor& hidden, const Tensor& weight,
                                              const c10::optional<Tensor>& bias, const Tensor& ids, const Tensor& lse,
                                              const Tensor& entropy, const Tensor& params, int64_t chunk_rows,
                                              bool compute_dweight, bool compute_dbias,
                                              const c10::optional<Tensor>& cutoff) {
  check_linear(hidden, weight, bias, chunk_rows);
  if (cutoff) check_cutoff(*cutoff, hidden.size(0));
  LinearChunks chunks(hidden, weight, bias, chunk_rows);
  const bool has_entropy_grad = grad_entropy.numel() > 0;
  const int64_t hidden_size = hidden.size(1);
  Tensor dhidden = at::empty({chunks.rows, hidden_size}, chunks.opts);
  compute_dbias = compute_dbias && bias.has_value();
  // The first chunk writes dweight, the others add to it (no zero fill, no read of zeros).
  Tensor dweight = at::empty({compute_dweight ? chunks.vocab : 0, compute_dweight ? hidden_size : 0}, chunks.opts);
  if (chunks.rows == 0) dweight.zero_();  // no chunk: the gradient of an empty batch is 0
  Tensor dbias = at::zeros({compute_dbias ? chunks.vocab : 0}, chunks.opts);
  chunks.for_each(hidden, [&](int64_t start, int64_t n, const Tensor& h, Tensor& logits) {
    logits_bwd_inplace(grad_logps.narrow(0, start, n), has_entropy_grad ? grad_entropy.narrow(0, start, n) : grad_entropy,
                       logits, ids.narrow(0, start, n), lse.narrow(0, start, n),
                       has_entropy_grad ? entropy.narrow(0, start, n) : entropy, params,
                       cutoff ? c10::optional<Tensor>(cutoff->narrow(0, start, n)) : c10::nullopt);
    const Tensor& dlogits = logits;  // (n, V), overwritten in place above
    Tensor dhidden_chunk = dhidden.narrow(0, start, n);
    at::mm_out(dhidden_chunk, dlogits, chunks.ops.weight);
    if (compute_dweight) {
      if (start == 0) {
        at::mm_out(dweight, dlogits.t(), h);
      } else {
        dweight.addmm_(dlogits.t(), h);
      }
    }
    if (compute_dbias) dbias.add_(dlogits.sum(0));
  });
  return {dhidden.to(hidden.scalar_type()), dweight.to(weight.scalar_type()),
          compute_dbias ? dbias.to(bias->scalar_type()) : dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(grpo_fused_cpp, CPU, m) {
  m.impl("logits_fwd", &logits_fwd);
  m.impl("logits_fwd_support", &logits_fwd_support);
  m.impl("logits_bwd", &logits_bwd);
  m.impl("logits_bwd_inplace", &logits_bwd_inplace);
  m.impl("linear_fwd", &linear_fwd);
  m.impl("linear_fwd_support", &linear_fwd_support);
  m.impl("linear_bwd", &linear_bwd);
}

}  // namespace grpo_fused_cpp
