// Group-relative advantages on CPU: per-group mean / std of the valid rewards, then
// (r - mean_g) / (std + eps), in three passes over the rewards (count and sum, squared
// deviations, advantages). Statistics accumulate in double whatever the rewards' dtype.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "params.h"

namespace grpo_fused_cpp {
namespace {

using at::Tensor;


// rewards (B,) float/double, NaN = unscored; group_index (B,) int64 in [0, G); keep_mask (B,) bool or (0,).
// Returns (advantages (B,), mean (G,), std (G,), count (G,) int64, zero_std (G,) bool); mean / std
// in the rewards' dtype, NaN where undefined (no valid reward; fewer than 2 when unbiased).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_advantages(const Tensor& rewards, const Tensor& group_index,
                                                                    int64_t num_groups, const Tensor& keep_mask,
                                                                    int64_t scale_mode, bool unbiased, double eps) {
  TORCH_CHECK(rewards.device().is_cpu(), "rewards must be a CPU tensor");
  TORCH_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), "rewards must be contiguous (B,), got ", rewards.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "rewards must be float32 or float64, got ", rewards.scalar_type());
  const int64_t batch = rewards.size(0);
  TORCH_CHECK(group_index.scalar_type() == at::kLong && group_index.is_contiguous() && group_index.dim() == 1 &&
                  group_index.size(0) == batch,
              "group_index must be contiguous int64 (", batch, ",)");
  TORCH_CHECK(num_groups >= 0, "num_groups must be >= 0, got ", num_groups);
  const bool has_keep = keep_mask.numel() > 0;
  if (has_keep) {
    TORCH_CHECK(keep_mask.scalar_type() == at::kBool && keep_mask.is_contiguous() && keep_mask.dim() == 1 &&
                    keep_mask.size(0) == batch,
                "keep_mask must be contiguous bool (", batch, ",)");
  }
  TORCH_CHECK(scale_mode >= kScaleGroup && scale_mode <= kScaleNone, "scale_mode must be 0 (group), 1 (batch) or 2 (none)");

  Tensor advantages = at::empty({batch}, rewards.options());
  Tensor mean = at::empty({num_groups}, rewards.options());
  Tensor std_out = at::empty({num_groups}, rewards.options());
  Tensor count_out = at::empty({num_groups}, rewards.options().dtype(at::kLong));
  Tensor zero_std = at::empty({num_groups}, rewards.options().dtype(at::kBool));

  const int64_t* index = group_index.const_data_ptr<int64_t>();
  const bool* keep = has_keep ? keep_mask.const_data_ptr<bool>() : nullptr;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(index[i] >= 0 && index[i] < num_groups, "group_index must lie in [0, ", num_groups, "), found ",
                index[i]);
  }

  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "grpo_fused_cpp::group_advantages", [&] {
    const scalar_t* r = rewards.const_data_ptr<scalar_t>();
    auto valid = [&](int64_t i) { return !std::isnan(static_cast<double>(r[i])) && (keep == nullptr || keep[i]); };
    std::vector<double> count(num_groups, 0.0), total(num_groups, 0.0), sq(num_groups, 0.0), mu(num_groups);
    double batch_n = 0.0, batch_total = 0.0;
    for (int64_t i = 0; i < batch; ++i) {
      if (!valid(i)) continue;
      count[index[i]] += 1.0;
      total[index[i]] += r[i];
      batch_n += 1.0;
      batch_total += r[i];
    }
    // Deviations from the group mean: two passes, not sum-of-squares minus square-of-sum.
    for (int64_t g = 0; g < num_groups; ++g) mu[g] = count[g] > 0 ? total[g] / count[g] : nan;
    const double batch_mean = batch_total / batch_n;
    double batch_sq = 0.0;
    for (int64_t i = 0; i < batch; ++i) {
      if (!valid(i)) continue;
      const double dev = r[i] - mu[index[i]];
      sq[index[i]] += dev * dev;
      const double batch_dev = r[i] - batch_mean;
      batch_sq += batch_dev * batch_dev;
    }
    const double min_count = unbiased ? 1.0 : 0.0;
    scalar_t* mean_ptr = mean.mutable_data_ptr<scalar_t>();
    scalar_t* std_ptr = std_out.mutable_data_ptr<scalar_t>();
    int64_t* count_ptr = count_out.mutable_data_ptr<int64_t>();
    bool* zero_ptr = zero_std.mutable_data_ptr<bool>();
    std::vector<double> sigma(num_groups);
    for (int64_t g = 0; g < num_groups; ++g) {
      sigma[g] = count[g] > min_count ? std::sqrt(sq[g] / (unbiased ? count[g] - 1 : count[g])) : nan;
      mean_ptr[g] = static_cast<scalar_t>(mu[g]);
      std_ptr[g] = static_cast<scalar_t>(sigma[g]);
      count_ptr[g] = static_cast<int64_t>(count[g]);
      zero_ptr[g] = count[g] < 2 || !(sigma[g] > 1e-8);
    }
    const double batch_sigma = std::sqrt(batch_sq / (unbiased ? batch_n - 1 : batch_n));
    scalar_t* adv = advantages.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < batch; ++i) {
      const int64_t g = index[i];
      if (!valid(i) || count[g] <= 1) {
        adv[i] = 0;  // unscored, filtered out or alone in its group: no learning signal
        continue;
      }
      double denom = 1.0;
      if (scale_mode == kScaleGroup) denom = sigma[g] + eps;
      if (scale_mode == kScaleBatch) denom = batch_sigma + eps;
      const double a = (r[i] - mu[g]) / denom;
      adv[i] = std::isfinite(a) ? static_cast<scalar_t>(a) : scalar_t(0);
    }
  });
  return {advantages, mean, std_out, count_out, zero_std};
}

}  // namespace

TORCH_LIBRARY_IMPL(grpo_fused_cpp, CPU, m) { m.impl("group_advantages", &group_advantages); }

}  // namespace grpo_fused_cpp
