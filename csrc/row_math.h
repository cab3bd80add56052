// Per-row log-softmax math shared by the logits and the linear ops.
//
// One row is one token's logits (V values, unit stride). The forward reads the row once from
// memory: it walks it in chunks of kChunk values that stay in L1, taking each chunk's max and
// then its sum of exponentials from the chunk buffer, and merges the chunk into running
// (max, sum) statistics (an online logsumexp). The backward reads the row once and writes the
// gradient once, recomputing the softmax from the saved lse.
//
// Reductions keep kLanes independent partial sums so that the compiler vectorizes them
// without reassociating floating-point adds (no -ffast-math: -inf logits must stay -inf).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace grpo_fused_cpp {

constexpr int kLanes = 16;
constexpr int64_t kChunk = 2048;

// exp(x) for float, branch-free so that loops over it vectorize (glibc's expf does not).
// Cody-Waite range reduction x = n ln2 + r with |r| <= ln2/2, then the Cephes degree-6
// polynomial (about 1 ulp). Inputs below -87 give exactly 0, which is what -inf logits need.
inline float exp_vectorizable(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  // Adding 1.5 * 2^23 rounds to the nearest integer in the low mantissa bits.
  const float shifted = clamped * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // NaN compares false and falls through to y * scale, which is NaN: NaN logits propagate.
  return x < -87.0f ? 0.0f : y * scale;
}

inline double exp_vectorizable(double x) { return std::exp(x); }

template <typename acc_t>
struct RowStats {
  acc_t lse;      // logsumexp(z), z = logits * inv_temperature
  acc_t entropy;  // lse - sum softmax(z) * z (only when asked)
};

// Online logsumexp (and entropy) of one row. `scale` is 1 / temperature.
//
// Running state: m = max so far, s = sum exp(z - m), w = sum exp(z - m) * (z - m). Keeping w
// relative to the max (w <= 0) avoids the cancellation of lse - sum p z for large logits.
// Entropy = log s - w / s.
template <bool kEntropy, typename scalar_t, typename acc_t>
inline RowStats<acc_t> row_forward(const scalar_t* row, int64_t vocab, acc_t scale) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  alignas(64) acc_t z[kChunk];
  acc_t m = kNegInf, s = 0, w = 0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t len = std::min(kChunk, vocab - start);
    const scalar_t* src = row + start;
    acc_t lane_max[kLanes];
    for (int l = 0; l < kLanes; ++l) lane_max[l] = kNegInf;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = static_cast<acc_t>(src[i + l]) * scale;
        z[i + l] = v;
        lane_max[l] = v > lane_max[l] ? v : lane_max[l];
      }
    }
    for (; i < len; ++i) {
      const acc_t v = static_cast<acc_t>(src[i]) * scale;
      z[i] = v;
      lane_max[0] = v > lane_max[0] ? v : lane_max[0];
    }
    acc_t chunk_max = kNegInf;
    for (int l = 0; l < kLanes; ++l) chunk_max = lane_max[l] > chunk_max ? lane_max[l] : chunk_max;
    if (chunk_max == kNegInf) {
      // Every value is -inf (masked vocab) or NaN; a NaN must still reach the sum.
      bool has_nan = false;
      for (int64_t j = 0; j < len; ++j) has_nan |= std::isnan(z[j]);
      if (!has_nan) continue;
      chunk_max = m == kNegInf ? acc_t(0) : m;
    }
    if (chunk_max > m) {
      if (s > 0) {
        const acc_t shift = m - chunk_max;
        const acc_t f = exp_vectorizable(shift);
        w = f * (w + shift * s);
        s = f * s;
      }
      m = chunk_max;
    }
    acc_t lane_s[kLanes] = {}, lane_w[kLanes] = {};
    i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t d = z[i + l] - m;
        const acc_t e = exp_vectorizable(d);
        lane_s[l] += e;
        // e * d is 0 * -inf = NaN on -inf logits; their share is 0.
        if (kEntropy) lane_w[l] += e > 0 ? e * d : acc_t(0);
      }
    }
    for (; i < len; ++i) {
      const acc_t d = z[i] - m;
      const acc_t e = exp_vectorizable(d);
      lane_s[0] += e;
      if (kEntropy) lane_w[0] += e > 0 ? e * d : acc_t(0);
    }
    acc_t chunk_s = 0, chunk_w = 0;
    for (int l = 0; l < kLanes; ++l) {
      chunk_s += lane_s[l];
      chunk_w += lane_w[l];
    }
    s += chunk_s;
    w += chunk_w;
  }
  const acc_t log_s = std::log(s);
  RowStats<acc_t> out;
  out.lse = m + log_s;
  out.entropy = kEntropy ? log_s - w / s : acc_t(0);
  return out;
}

// Gradient of one row: with z = logits * scale, p = softmax(z), logp_j = z_j - lse, H the entropy,
//   dz_j = g_logp * (1[j == id] - p_j) - g_entropy * p_j * (logp_j + H)
//   dlogits_j = dz_j * scale.
// `out` may alias `row` (in-place backward): each value is read before it is written.
template <bool kEntropy, typename scalar_t, typename acc_t>
inline void row_backward(
    const scalar_t* row,
    scalar_t* out,
    int64_t vocab,
    int64_t id,
    acc_t scale,
    acc_t lse,
    acc_t entropy,
    acc_t grad_logp,
    acc_t grad_entropy) {
  if (grad_logp == 0 && (!kEntropy || grad_entropy == 0)) {
    // Masked-out tokens: their gradient is exactly zero, no need to touch the softmax.
    for (int64_t j = 0; j < vocab; ++j) out[j] = scalar_t(0);
    return;
  }
  const acc_t target_logp = static_cast<acc_t>(row[id]) * scale - lse;
  for (int64_t j = 0; j < vocab; ++j) {
    const acc_t logp = static_cast<acc_t>(row[j]) * scale - lse;
    const acc_t p = exp_vectorizable(logp);
    acc_t coeff = grad_logp;
    if (kEntropy) coeff += grad_entropy * (logp + entropy);
    // p * coeff is 0 * -inf on -inf logits when the entropy term is on; their gradient is 0.
    const acc_t dz = p > 0 ? -p * coeff : acc_t(0);
    out[j] = static_cast<scalar_t>(dz * scale);
  }
  const acc_t p_target = exp_vectorizable(target_logp);
  acc_t dz_target = grad_logp * (1 - p_target);
  if (kEntropy && p_target > 0) dz_target -= grad_entropy * p_target * (target_logp + entropy);
  out[id] = static_cast<scalar_t>(dz_target * scale);
}

}  // namespace grpo_fused_cpp
