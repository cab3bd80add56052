// Selective log-softmax on CPU: per-token logp = z[id] - logsumexp(z) and entropy, z = logits / T,
// from logits (the "logits" ops) or from hidden states and the lm_head weight, chunk by chunk
// (the "linear" ops). Schemas are in registration.cpp; row math in row_math.h.
// Per-operator headers instead of ATen/ATen.h: a third of the compile time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "params.h"
#include "row_math.h"

namespace grpo_fused_cpp {
namespace {

using at::Tensor;

// Rows per parallel task: enough that a task is at least ~64k values of work.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1)); }

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A (B, T, V) or (N, V) tensor with unit stride over V, seen as rows r = b * T + t.
struct RowView {
  int64_t rows, inner, vocab, stride_outer, stride_inner;
  explicit RowView(const Tensor& t) {
    if (t.dim() == 3) {
      inner = t.size(1);
      rows = t.size(0) * inner;
      stride_outer = t.stride(0);
      stride_inner = t.stride(1);
    } else {
      inner = t.size(0);
      rows = inner;
      stride_outer = 0;
      stride_inner = t.stride(0);
    }
    vocab = t.size(-1);
  }
  // int64 offsets: N * V can exceed 2^31.
  int64_t offset(int64_t r) const {
    const int64_t outer = inner > 0 ? r / inner : 0;
    return outer * stride_outer + (r - outer * inner) * stride_inner;
  }
};

void check_logits(const Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, name, " must be (N, V) or (B, T, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(-1) > 0, name, " must have V > 0");
  TORCH_CHECK(logits.size(-1) == 1 || logits.stride(-1) == 1, name, " must have unit stride over V, got strides ",
              logits.strides());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), name, " must be float32, bfloat16, float16 or float64, got ",
              logits.scalar_type());
}

void check_rows(const Tensor& t, int64_t rows, const char* name, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), name, " must be contiguous (", rows,
              ",), got ", t.sizes());
  if (dtype) TORCH_CHECK(t.scalar_type() == *dtype, name, " must be ", *dtype, ", got ", t.scalar_type());
}

// Fills logps / lse / entropy (contiguous (rows,), acc dtype) for every row of `logits`.
template <typename scalar_t, typename acc_t>
void forward_rows(const Tensor& logits, const int64_t* ids, acc_t scale, bool compute_entropy, acc_t* logps,
                  acc_t* lse, acc_t* entropy) {
  const RowView view(logits);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  at::parallel_for(0, view.rows, grain_rows(view.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // One compare per row; the Python API checks ids too, but GRPO_FUSED_CHECK_IDS=0 skips that.
      TORCH_CHECK(ids[r] >= 0 && ids[r] < view.vocab, "ids must lie in [0, ", view.vocab, "), found ", ids[r]);
      const scalar_t* row = base + view.offset(r);
      RowStats<acc_t> stats = compute_entropy ? row_forward<true>(row, view.vocab, scale)
                                              : row_forward<false>(row, view.vocab, scale);
      lse[r] = stats.lse;
      logps[r] = static_cast<acc_t>(row[ids[r]]) * scale - stats.lse;
      if (compute_entropy) entropy[r] = stats.entropy;
    }
  });
}

// Writes the gradient of every row of `logits` into `dlogits` (same shape; may be `logits` itself).
template <typename scalar_t, typename acc_t>
void backward_rows(const Tensor& logits, Tensor& dlogits, const int64_t* ids, acc_t scale, const acc_t* lse,
                   const acc_t* entropy, const acc_t* grad_logps, const acc_t* grad_entropy) {
  const RowView in_view(logits), out_view(dlogits);
  const scalar_t* in_base = logits.const_data_ptr<scalar_t>();
  scalar_t* out_base = dlogits.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, in_view.rows, grain_rows(in_view.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      TORCH_CHECK(ids[r] >= 0 && ids[r] < in_view.vocab, "ids must lie in [0, ", in_view.vocab, "), found ", ids[r]);
      const scalar_t* row = in_base + in_view.offset(r);
      scalar_t* out = out_base + out_view.offset(r);
      if (grad_entropy != nullptr) {
        row_backward<true>(row, out, in_view.vocab, ids[r], scale, lse[r], entropy[r], grad_logps[r], grad_entropy[r]);
      } else {
        row_backward<false>(row, out, in_view.vocab, ids[r], scale, lse[r], acc_t(0), grad_logps[r], acc_t(0));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Logits ops.
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> logits_fwd(const Tensor& logits, const Tensor& ids, const Tensor& params,
                                              bool compute_entropy) {
  check_logits(logits, "logits");
  const double inv_temperature = param(params, kSlotInvTemperature);
  const RowView view(logits);
  check_rows(ids, view.rows, "ids", at::kLong);
  const auto acc = acc_type_of(logits.scalar_type());
  auto opts = logits.options().dtype(acc);
  Tensor logps = at::empty({view.rows}, opts);
  Tensor lse = at::empty({view.rows}, opts);
  Tensor entropy = at::empty({compute_entropy ? view.rows : 0}, opts);
  if (view.rows == 0) return {logps, lse, entropy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "grpo_fused_cpp::logits_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_rows<scalar_t, acc_t>(logits, ids.const_data_ptr<int64_t>(), static_cast<acc_t>(inv_temperature),
                                  compute_entropy, logps.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
                                  compute_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {logps, lse, entropy};
}

// grad_entropy may be empty (0,): the entropy was not used, its term is skipped.
void logits_bwd_into(const Tensor& grad_logps, const Tensor& grad_entropy, const Tensor& logits, const Tensor& ids,
                     const Tensor& lse, const Tensor& entropy, const Tensor& params, Tensor& dlogits) {
  check_logits(logits, "logits");
  const double inv_temperature = param(params, kSlotInvTemperature);
  const RowView view(logits);
  const auto acc = acc_type_of(logits.scalar_type());
  check_rows(ids, view.rows, "ids", at::kLong);
  check_rows(grad_logps, view.rows, "grad_logps", acc);
  check_rows(lse, view.rows, "lse", acc);
  const bool has_entropy_grad = grad_entropy.numel() > 0;
  if (has_entropy_grad) {
    check_rows(grad_entropy, view.rows, "grad_entropy", acc);
    check_rows(entropy, view.rows, "entropy", acc);
  }
  if (view.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "grpo_fused_cpp::logits_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_rows<scalar_t, acc_t>(logits, dlogits, ids.const_data_ptr<int64_t>(), static_cast<acc_t>(inv_temperature),
                                   lse.const_data_ptr<acc_t>(),
                                   has_entropy_grad ? entropy.const_data_ptr<acc_t>() : nullptr,
                                   grad_logps.const_data_ptr<acc_t>(),
                                   has_entropy_grad ? grad_entropy.const_data_ptr<acc_t>() : nullptr);
  });
}

Tensor logits_bwd(const Tensor& grad_logps, const Tensor& grad_entropy, const Tensor& logits, const Tensor& ids,
                  const Tensor& lse, const Tensor& entropy, const Tensor& params) {
  Tensor dlogits = at::empty(logits.sizes(), logits.options());
  logits_bwd_into(grad_logps, grad_entropy, logits, ids, lse, entropy, params, dlogits);
  return dlogits;
}

// Same as logits_bwd, but the gradient overwrites `logits` (zero extra memory).
void logits_bwd_inplace(const Tensor& grad_logps, const Tensor& grad_entropy, Tensor& logits, const Tensor& ids,
                        const Tensor& lse, const Tensor& entropy, const Tensor& params) {
  logits_bwd_into(grad_logps, grad_entropy, logits, ids, lse, entropy, params, logits);
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

// (rows, V) compute-dtype logits of hidden[start : start + rows] into `buffer`'s first rows.
Tensor chunk_logits(const LinearOperands& ops, const Tensor& hidden, int64_t start, int64_t rows, Tensor& buffer) {
  Tensor h = hidden.narrow(0, start, rows).to(ops.acc);
  Tensor out = buffer.narrow(0, 0, rows);
  if (ops.bias) {
    at::addmm_out(out, *ops.bias, h, ops.weight_t);
  } else {
    at::mm_out(out, h, ops.weight_t);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_fwd(const Tensor& hidden, const Tensor& weight,
                                              const c10::optional<Tensor>& bias, const Tensor& ids,
                                              const Tensor& params, bool compute_entropy, int64_t chunk_rows) {
  check_linear(hidden, weight, bias, chunk_rows);
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  check_rows(ids, rows, "ids", at::kLong);
  LinearOperands ops = linear_operands(hidden, weight, bias);
  auto opts = hidden.options().dtype(ops.acc);
  Tensor logps = at::empty({rows}, opts);
  Tensor lse = at::empty({rows}, opts);
  Tensor entropy = at::empty({compute_entropy ? rows : 0}, opts);
  const int64_t chunk = std::min(chunk_rows, std::max<int64_t>(rows, 1));
  Tensor buffer = at::empty({chunk, vocab}, opts);
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t n = std::min(chunk, rows - start);
    Tensor logits = chunk_logits(ops, hidden, start, n, buffer);
    auto [chunk_logps, chunk_lse, chunk_entropy] =
        logits_fwd(logits, ids.narrow(0, start, n), params, compute_entropy);
    logps.narrow(0, start, n).copy_(chunk_logps);
    lse.narrow(0, start, n).copy_(chunk_lse);
    if (compute_entropy) entropy.narrow(0, start, n).copy_(chunk_entropy);
  }
  return {logps, lse, entropy};
}

// Returns (dhidden (N, H), dweight (V, H), dbias (V,)) in the input dtypes.
// dweight / dbias are skipped, and returned as (0,), when not asked for (a frozen lm_head).
std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& grad_logps, const Tensor& grad_entropy,
                                              const Tensor& hidden, const Tensor& weight,
                                              const c10::optional<Tensor>& bias, const Tensor& ids, const Tensor& lse,
                                              const Tensor& entropy, const Tensor& params, int64_t chunk_rows,
                                              bool compute_dweight, bool compute_dbias) {
  check_linear(hidden, weight, bias, chunk_rows);
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  LinearOperands ops = linear_operands(hidden, weight, bias);
  auto opts = hidden.options().dtype(ops.acc);
  const bool has_entropy_grad = grad_entropy.numel() > 0;
  Tensor dhidden = at::empty({rows, hidden.size(1)}, opts);
  compute_dbias = compute_dbias && bias.has_value();
  Tensor dweight = at::zeros({compute_dweight ? vocab : 0, compute_dweight ? hidden.size(1) : 0}, opts);
  Tensor dbias = at::zeros({compute_dbias ? vocab : 0}, opts);
  const int64_t chunk = std::min(chunk_rows, std::max<int64_t>(rows, 1));
  Tensor buffer = at::empty({chunk, vocab}, opts);
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t n = std::min(chunk, rows - start);
    Tensor logits = chunk_logits(ops, hidden, start, n, buffer);
    logits_bwd_inplace(grad_logps.narrow(0, start, n), has_entropy_grad ? grad_entropy.narrow(0, start, n) : grad_entropy,
                       logits, ids.narrow(0, start, n), lse.narrow(0, start, n),
                       has_entropy_grad ? entropy.narrow(0, start, n) : entropy, params);
    const Tensor& dlogits = logits;  // (n, V), overwritten in place above
    Tensor h = hidden.narrow(0, start, n).to(ops.acc);
    Tensor dhidden_chunk = dhidden.narrow(0, start, n);
    at::mm_out(dhidden_chunk, dlogits, ops.weight);
    if (compute_dweight) dweight.addmm_(dlogits.t(), h);
    if (compute_dbias) dbias.add_(dlogits.sum(0));
  }
  return {dhidden.to(hidden.scalar_type()), dweight.to(weight.scalar_type()),
          compute_dbias ? dbias.to(bias->scalar_type()) : dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(grpo_fused_cpp, CPU, m) {
  m.impl("logits_fwd", &logits_fwd);
  m.impl("logits_bwd", &logits_bwd);
  m.impl("logits_bwd_inplace", &logits_bwd_inplace);
  m.impl("linear_fwd", &linear_fwd);
  m.impl("linear_bwd", &linear_bwd);
}

}  // namespace grpo_fused_cpp
