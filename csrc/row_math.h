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
#include <type_traits>

namespace grpo_fused_cpp {

constexpr int kLanes = 16;
constexpr int64_t kChunk = 2048;

// Eight floats in one value, with GCC / Clang vector extensions: the compiler emits AVX2 when
// built with -mavx2 and pairs of SSE instructions otherwise, from the same code.
typedef float vfloat __attribute__((vector_size(32), aligned(4)));
typedef int32_t vint __attribute__((vector_size(32), aligned(4)));
constexpr int kWidth = 8;

inline vfloat splat(float x) { return vfloat{x, x, x, x, x, x, x, x}; }
inline vfloat vload(const float* p) { return *reinterpret_cast<const vfloat*>(p); }
inline void vstore(float* p, vfloat v) { *reinterpret_cast<vfloat*>(p) = v; }
inline vfloat vselect(vint mask, vfloat a, vfloat b) { return mask ? a : b; }
inline float hsum(vfloat v) {
  float out = 0;
  for (int i = 0; i < kWidth; ++i) out += v[i];
  return out;
}
inline float hmax(vfloat v) {
  float out = v[0];
  for (int i = 1; i < kWidth; ++i) out = v[i] > out ? v[i] : out;
  return out;
}

// exp(x) on eight floats (glibc's expf does not vectorize). Cody-Waite range reduction
// x = n ln2 + r with |r| <= ln2/2, then the Cephes degree-6 polynomial (about 1 ulp). Inputs
// below -87 give exactly 0, which is what -inf logits need; NaN stays NaN.
inline vfloat vexp(vfloat x) {
  const vfloat lo = splat(-87.0f), hi = splat(88.0f);
  vfloat c = vselect(x < lo, lo, x);
  c = vselect(c > hi, hi, c);
  // Adding 1.5 * 2^23 rounds to the nearest integer in the low mantissa bits.
  const vfloat magic = splat(12582912.0f);
  const vfloat n = (c * 1.44269504088896341f + magic) - magic;
  vfloat r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat y = p * r * r + r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat scale = (vfloat)bits;  // a vector cast reinterprets the bits (no aliasing UB)
  const vfloat out = y * scale;
  // NaN > -87 is false too, so test "below -87" rather than "not above".
  return vselect(x < lo, splat(0.0f), vselect(x != x, x, out));
}

template <typename acc_t>
struct RowStats {
  acc_t lse;      // logsumexp(z), z = logits * inv_temperature
  acc_t entropy;  // lse - sum softmax(z) * z (only when asked)
};

// Online logsumexp state: m = max so far, s = sum exp(z - m), w = sum exp(z - m) * (z - m).
// Keeping w relative to the max (w <= 0) avoids the cancellation of lse - sum p z for large
// logits; entropy = log s - w / s.
template <typename acc_t>
struct OnlineState {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0, w = 0;

  // Moves the reference point to a larger max (s > 0 implies m is finite).
  void rescale_to(acc_t new_max) {
    if (!(new_max > m)) return;
    if (s > 0) {
      const acc_t shift = m - new_max;
      const acc_t f = std::exp(shift);
      w = f * (w + shift * s);
      s = f * s;
    }
    m = new_max;
  }

  RowStats<acc_t> finish(bool entropy) const {
    const acc_t log_s = std::log(s);
    return {m + log_s, entropy ? log_s - w / s : acc_t(0)};
  }
};

// Scaled float copy of values [start, start + len) of a row.
template <typename scalar_t>
inline void load_scaled(const scalar_t* src, int64_t len, float scale, float* z) {
  for (int64_t i = 0; i < len; ++i) z[i] = static_cast<float>(src[i]) * scale;
}

// The float path: each kChunk slice is converted once into an L1-resident buffer, then its max
// and its sums are taken from there. The row is read from memory once.
template <bool kEntropy, typename scalar_t>
inline RowStats<float> row_forward_float(const scalar_t* row, int64_t vocab, float scale) {
  alignas(64) float z[kChunk];
  OnlineState<float> st;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t len = std::min(kChunk, vocab - start);
    load_scaled(row + start, len, scale, z);
    const int64_t full = len - len % kWidth;
    vfloat vmax = splat(kNegInf);
    bool has_nan = false;
    for (int64_t i = 0; i < full; i += kWidth) {
      const vfloat v = vload(z + i);
      vmax = vselect(v > vmax, v, vmax);
    }
    float chunk_max = hmax(vmax);
    for (int64_t i = full; i < len; ++i) chunk_max = z[i] > chunk_max ? z[i] : chunk_max;
    if (!(chunk_max > kNegInf)) {
      // Every value is -inf (masked vocabulary) or NaN; a NaN must still reach the sum.
      for (int64_t i = 0; i < len; ++i) has_nan |= std::isnan(z[i]);
      if (!has_nan) continue;
      chunk_max = st.m > kNegInf ? st.m : 0.0f;
    }
    st.rescale_to(chunk_max);
    const vfloat m = splat(st.m), zero = splat(0.0f);
    vfloat s0 = zero, s1 = zero, w0 = zero, w1 = zero;  // two accumulators hide the add latency
    int64_t i = 0;
    for (; i + 2 * kWidth <= full; i += 2 * kWidth) {
      const vfloat d0 = vload(z + i) - m, d1 = vload(z + i + kWidth) - m;
      const vfloat e0 = vexp(d0), e1 = vexp(d1);
      s0 += e0;
      s1 += e1;
      if (kEntropy) {
        // e * d is 0 * -inf = NaN on -inf logits; their share is 0.
        w0 += vselect(e0 > zero, e0 * d0, zero);
        w1 += vselect(e1 > zero, e1 * d1, zero);
      }
    }
    for (; i < full; i += kWidth) {
      const vfloat d0 = vload(z + i) - m;
      const vfloat e0 = vexp(d0);
      s0 += e0;
      if (kEntropy) w0 += vselect(e0 > zero, e0 * d0, zero);
    }
    float chunk_s = hsum(s0 + s1), chunk_w = hsum(w0 + w1);
    for (; i < len; ++i) {
      const float d = z[i] - st.m;
      const float e = std::exp(d);
      chunk_s += e;
      if (kEntropy && e > 0) chunk_w += e * d;
    }
    st.s += chunk_s;
    st.w += chunk_w;
  }
  return st.finish(kEntropy);
}

// The double path (fp64 inputs, gradcheck): plain loops, no staging.
template <bool kEntropy>
inline RowStats<double> row_forward_double(const double* row, int64_t vocab, double scale) {
  OnlineState<double> st;
  for (int64_t j = 0; j < vocab; ++j) st.rescale_to(row[j] * scale);
  if (st.m == -std::numeric_limits<double>::infinity()) return st.finish(kEntropy);  // all -inf
  for (int64_t j = 0; j < vocab; ++j) {
    const double d = row[j] * scale - st.m;
    const double e = std::exp(d);
    st.s += e;
    if (kEntropy && e > 0) st.w += e * d;
  }
  return st.finish(kEntropy);
}

// Logsumexp (and entropy) of one row of `vocab` values; `scale` is 1 / temperature.
template <bool kEntropy, typename scalar_t, typename acc_t>
inline RowStats<acc_t> row_forward(const scalar_t* row, int64_t vocab, acc_t scale) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return row_forward_double<kEntropy>(row, vocab, scale);
  } else {
    return row_forward_float<kEntropy>(row, vocab, scale);
  }
}

// Gradient of one row: with z = logits * scale, p = softmax(z), logp_j = z_j - lse, H the entropy,
//   dz_j = g_logp * (1[j == id] - p_j) - g_entropy * p_j * (logp_j + H)
//   dlogits_j = dz_j * scale.
// `out` may alias `row` (in-place backward): each chunk is read before it is written.
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
  if constexpr (std::is_same_v<acc_t, double>) {
    for (int64_t j = 0; j < vocab; ++j) {
      const double logp = row[j] * scale - lse;
      const double p = std::exp(logp);
      const double coeff = kEntropy ? grad_logp + grad_entropy * (logp + entropy) : grad_logp;
      out[j] = p > 0 ? -p * coeff * scale : 0.0;
    }
  } else {
    // float logits are read and written in place; other dtypes are staged through a float chunk.
    alignas(64) float buf[kChunk];
    const vfloat zero = splat(0.0f);
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t len = std::min(kChunk, vocab - start);
      const float* z;
      float* dz;
      if constexpr (std::is_same_v<scalar_t, float>) {
        z = row + start;
        dz = out + start;
      } else {
        load_scaled(row + start, len, 1.0f, buf);
        z = dz = buf;
      }
      const int64_t full = len - len % kWidth;
      for (int64_t i = 0; i < full; i += kWidth) {
        const vfloat logp = vload(z + i) * scale - lse;
        const vfloat p = vexp(logp);
        vfloat coeff = splat(grad_logp);
        if (kEntropy) coeff += grad_entropy * (logp + entropy);
        // p * coeff is 0 * -inf on -inf logits when the entropy term is on; their gradient is 0.
        vstore(dz + i, vselect(p > zero, -p * coeff * scale, zero));
      }
      for (int64_t i = full; i < len; ++i) {
        const float logp = z[i] * scale - lse;
        const float p = std::exp(logp);
        const float coeff = kEntropy ? grad_logp + grad_entropy * (logp + entropy) : grad_logp;
        dz[i] = p > 0 ? -p * coeff * scale : 0.0f;
      }
      if constexpr (!std::is_same_v<scalar_t, float>) {
        scalar_t* dst = out + start;
        for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
      }
    }
  }
  const acc_t p_target = std::exp(target_logp);
  acc_t dz_target = grad_logp * (1 - p_target);
  if (kEntropy && p_target > 0) dz_target -= grad_entropy * p_target * (target_logp + entropy);
  out[id] = static_cast<scalar_t>(dz_target * scale);
}

}  // namespace grpo_fused_cpp
