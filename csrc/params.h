// The codes the C++ ops share with the Python package (grpo_fused/semantics): the slot of each
// float hyperparameter in the float64 `params` vector (semantics.Slot) and the advantage scale
// codes (semantics.AdvantageScale). tests/test_cpp_backend.py checks these against Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace grpo_fused_cpp {

// grpo_fused.semantics.Slot
constexpr int64_t kSlotInvTemperature = 0;
constexpr int64_t kSlotTopK = 12;  // sampling support (grpo_fused.semantics.SamplingRule)
constexpr int64_t kSlotTopP = 13;
constexpr int64_t kSlotLogMinP = 14;
constexpr int64_t kNumSlots = 15;

// grpo_fused.semantics.AdvantageScale
enum ScaleMode : int64_t { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// One float hyperparameter from the (kNumSlots,) float64 CPU vector.
inline double param(const at::Tensor& params, int64_t slot) {
  TORCH_CHECK(params.device().is_cpu() && params.scalar_type() == at::kDouble && params.dim() == 1 &&
                  params.size(0) == kNumSlots && params.is_contiguous(),
              "params must be a contiguous (", kNumSlots, ",) float64 CPU tensor, got ", params.sizes(), " ",
              params.scalar_type());
  return params.const_data_ptr<double>()[slot];
}

}  // namespace grpo_fused_cpp
