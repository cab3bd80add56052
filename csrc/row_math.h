// Per-row log-softmax math: the row kernels behind the logits and linear ops.
//
// This file is compiled once per instruction set. kernels_<isa>.cpp includes the standard headers,
// switches the compiler to that instruction set (#pragma GCC target), defines GRPO_FUSED_ISA (the
// namespace of that copy) and GRPO_FUSED_VEC_BYTES (16, 32 or 64) and includes this file; cpu_dispatch
// in log_softmax.cpp picks a copy at run time. Everything defined here lives in the per-ISA
// namespace, so two copies never share a symbol (an inline function compiled for AVX-512 and
// merged by the linker into the baseline copy would crash an older CPU). Nothing here includes a
// torch header for the same reason.
//
// One row is one token's logits (V values, unit stride). Forward: the row is walked in chunks of
// kChunk values (L2-resident); a first pass takes the chunk's max straight from memory, a second
// pass sums exp(z - max) (and exp(z - max) (z - max) for the entropy) from L2, and the chunk is
// merged into running (max, sum) statistics (an online logsumexp). While the second pass runs, the
// next row is prefetched, so its first pass reads from cache. Backward: one read of the row and
// one write of the gradient, the softmax recomputed from the saved lse. 16-bit rows are converted
// in registers (no staging buffer).
//
// Reductions keep 2 vector accumulators (8, 16 or 32 partial sums) so the adds are vector adds in a
// fixed order; no -ffast-math (-inf logits must stay -inf, NaN must propagate). The build turns
// off implicit contraction (-ffp-contract=off), so every rounding is the one written here:
// multiply-adds are explicit (vfma), fused on AVX2 / AVX-512, a multiply and an add on the
// baseline; the copies agree to a few ulps, not bit for bit. z = x * scale is always rounded
// before it is used, as eager PyTorch's logits / T is.

#ifndef GRPO_FUSED_ISA
#error "row_math.h is compiled once per instruction set: include it from kernels_<isa>.cpp"
#endif

namespace grpo_fused_cpp {
namespace GRPO_FUSED_ISA {

constexpr int kWidth = GRPO_FUSED_VEC_BYTES / 4;  // floats per vector: 4 (baseline), 8 (AVX2), 16 (AVX-512)
constexpr int64_t kChunk = 16384;                 // values per forward chunk: 64 KiB of fp32, L2-resident

typedef float vfloat __attribute__((vector_size(GRPO_FUSED_VEC_BYTES), aligned(4)));
typedef int32_t vint __attribute__((vector_size(GRPO_FUSED_VEC_BYTES), aligned(4)));
typedef uint32_t vuint __attribute__((vector_size(GRPO_FUSED_VEC_BYTES), aligned(4)));
typedef uint16_t vushort __attribute__((vector_size(GRPO_FUSED_VEC_BYTES / 2), aligned(2)));

// The 16-bit element types (the layout of c10::BFloat16 / c10::Half).
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline vfloat splat(float x) { return vfloat{} + x; }
inline vuint usplat(uint32_t x) { return vuint{} + x; }
// A cast between vector types of one size reinterprets the bits (GCC / Clang vector extensions).
inline vfloat as_float(vuint v) { return (vfloat)v; }
inline vuint as_uint(vfloat v) { return (vuint)v; }
inline vfloat vselect(vint mask, vfloat a, vfloat b) { return mask ? a : b; }

// a > b ? a : b and a < b ? a : b: `b` when either is NaN (the x86 MAXPS / MINPS rule, one
// instruction there; GCC does not match the ternary to it).
inline vfloat vmax(vfloat a, vfloat b) {
#if GRPO_FUSED_VEC_BYTES == 64
  return (vfloat)_mm512_max_ps((__m512)a, (__m512)b);
#elif GRPO_FUSED_VEC_BYTES == 32
  return (vfloat)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE2__)
  return (vfloat)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;
#endif
}
inline vfloat vmin(vfloat a, vfloat b) {
#if GRPO_FUSED_VEC_BYTES == 64
  return (vfloat)_mm512_min_ps((__m512)a, (__m512)b);
#elif GRPO_FUSED_VEC_BYTES == 32
  return (vfloat)_mm256_min_ps((__m256)a, (__m256)b);
#elif defined(__SSE2__)
  return (vfloat)_mm_min_ps((__m128)a, (__m128)b);
#else
  return a < b ? a : b;
#endif
}

inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if GRPO_FUSED_VEC_BYTES == 64
  return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(GRPO_FUSED_FMA)
  return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

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
inline int64_t hsum(vint v) {
  int64_t out = 0;
  for (int i = 0; i < kWidth; ++i) out += v[i];
  return out;
}

// {0, 1, ..., kWidth - 1}: the offsets of a vector's lanes.
inline vint lane_index() {
  vint v;
  for (int i = 0; i < kWidth; ++i) v[i] = i;
  return v;
}

// Bit i set when lane i of the mask (all ones or zero per lane) is set.
inline uint32_t lane_bits(vint mask) {
#if GRPO_FUSED_VEC_BYTES == 64
  return _mm512_movepi32_mask((__m512i)mask);
#elif GRPO_FUSED_VEC_BYTES == 32
  return static_cast<uint32_t>(_mm256_movemask_ps((__m256)mask));
#elif defined(__SSE2__)
  return static_cast<uint32_t>(_mm_movemask_ps((__m128)mask));
#else
  uint32_t bits = 0;
  for (int i = 0; i < kWidth; ++i) bits |= (mask[i] != 0 ? 1u : 0u) << i;
  return bits;
#endif
}

// ---- loads and stores of kWidth elements, converted to / from float ----

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline vfloat load(const BF16* p) {
  // The 16 bits of a bfloat16 are the high half of its float. (GCC lowers the generic zero-extend
  // of 16 halves to five AVX-512 instructions; VPMOVZXWD is one.)
#if GRPO_FUSED_VEC_BYTES == 64
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vfloat)_mm512_slli_epi32(u, 16);
#elif GRPO_FUSED_VEC_BYTES == 32
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm256_slli_epi32(u, 16);
#else
  vushort h;
  std::memcpy(&h, p, sizeof h);
  return as_float(__builtin_convertvector(h, vuint) << 16);
#endif
}
// Round to nearest even, NaN -> 0x7FC0: c10::BFloat16's rounding, bit for bit.
inline void store(BF16* p, vfloat v) {
  const vuint u = as_uint(v);
  vuint r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? usplat(0x7FC0u) : r;
  const vushort h = __builtin_convertvector(r, vushort);
  std::memcpy(p, &h, sizeof h);
}

#if defined(GRPO_FUSED_F16C)
// IEEE half <-> float in hardware (F16C), round to nearest even.
inline vfloat load(const F16* p) {
#if GRPO_FUSED_VEC_BYTES == 64
  return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
}
inline void store(F16* p, vfloat v) {
#if GRPO_FUSED_VEC_BYTES == 64
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#else
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#endif
}
#else
// IEEE half <-> float in integer and float arithmetic (the algorithms of the FP16 library that
// c10::Half uses, lane by lane); exact, round to nearest even.
inline vfloat load(const F16* p) {
  vushort h;
  std::memcpy(&h, p, sizeof h);
  const vuint w = __builtin_convertvector(h, vuint) << 16;
  const vuint sign = w & 0x80000000u;
  const vuint two_w = w + w;
  const vfloat normalized = as_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const vfloat denormalized = as_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return as_float(sign | ((two_w < (1u << 27)) ? as_uint(denormalized) : as_uint(normalized)));
}
inline void store(F16* p, vfloat v) {
  const vfloat magnitude = as_float(as_uint(v) & 0x7FFFFFFFu);
  vfloat base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
  const vuint w = as_uint(v);
  const vuint shl1_w = w + w;
  const vuint sign = w & 0x80000000u;
  vuint bias = shl1_w & 0xFF000000u;
  bias = (bias < 0x71000000u) ? usplat(0x71000000u) : bias;
  base = as_float((bias >> 1) + 0x07800000u) + base;
  const vuint bits = as_uint(base);
  const vuint nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vuint out = (sign >> 16) | ((shl1_w > 0xFF000000u) ? usplat(0x7E00u) : nonsign);
  const vushort h = __builtin_convertvector(out, vushort);
  std::memcpy(p, &h, sizeof h);
}
#endif

// The first n < kWidth elements, the other lanes `fill`.
template <typename T>
inline vfloat load_partial(const T* p, int64_t n, float fill) {
  T tmp[kWidth];
  store(tmp, splat(fill));
  std::memcpy(tmp, p, n * sizeof(T));
  return load(tmp);
}
template <typename T>
inline void store_partial(T* p, int64_t n, vfloat v) {
  T tmp[kWidth];
  store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}
template <typename T>
inline float load_one(const T* p) {
  return load_partial(p, 1, 0.0f)[0];
}
template <typename T>
inline void store_one(T* p, float x) {
  store_partial(p, 1, splat(x));
}

// ---- which tokens of a row the softmax runs over ----

// Every token: the plain vocabulary pass (the selects that KeptTokens needs compile away).
struct EveryToken {
  static constexpr bool kEvery = true;
  template <typename acc_t>
  bool keeps(acc_t, int64_t) const {
    return true;
  }
  vint keeps(vfloat, int64_t) const { return vint{} - 1; }
};

// A sampling support's cutoff (cpu_kernels.h, found by sampling_support.h): token v is kept when
// z > tau, or z == tau and v < tie_end; kEveryTie keeps every token tied with tau (one compare a
// vector). A NaN tau keeps nothing.
constexpr int64_t kEveryTie = std::numeric_limits<int64_t>::max();

template <typename acc_t>
struct KeptTokens {
  static constexpr bool kEvery = false;
  acc_t tau;
  int64_t tie_end;

  bool keeps(acc_t z, int64_t id) const { return z > tau || (z == tau && id < tie_end); }
  // The kWidth tokens first_id, first_id + 1, ... (float rows; the ops check V < 2^31).
  vint keeps(vfloat z, int64_t first_id) const {
    const vfloat t = splat(tau);
    if (tie_end == kEveryTie) return z >= t;
    const vint ids = lane_index() + static_cast<int32_t>(first_id);
    return (z > t) | ((z == t) & (ids < static_cast<int32_t>(tie_end)));
  }
};

// Prefetch `bytes` bytes from p into L2, one request per cache line.
inline void prefetch_l2(const char* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
}

// ---- exp ----

// exp(x) on kWidth floats (glibc's expf does not vectorize), for x <= 88. Cody-Waite range
// reduction x = n ln2 + r with |r| <= ln2/2, then 1 + r + r^2 q(r) with q a degree-4 fit of
// (e^r - 1 - r) / r^2 (relative error 4e-9 in exact arithmetic; measured 1.03 ulp in float over
// [-88, 88], against 1.01 for the Cephes degree-5 q it replaces, one FMA fewer), and 2^n built in
// the exponent field. x is clamped below at -88: there n = -127 gives an exponent field of 0, so
// every x <= -88 (and -inf, a masked logit) gives exactly 0 with no separate test. NaN stays NaN
// (MAXPS keeps its second operand, and NaN * 2^n is NaN). kClampHigh clamps at 88 too, for
// inputs not known to be <= 0.
struct ExpParts {
  vfloat y, pow2n;  // exp(x) = y * pow2n
};

template <bool kClampHigh = false>
inline ExpParts vexp_parts(vfloat x) {
  x = vmax(splat(-88.0f), x);
  if (kClampHigh) x = vmin(splat(88.0f), x);
  // t = x log2(e) + 1.5 * 2^23: the addition rounds x log2(e) to the integer n, kept in the low
  // mantissa bits of t; (bits of t) << 23 is then n << 23 (the bits of 1.5 * 2^23 shift out).
  const vfloat magic = splat(12582912.0f);
  const vfloat t = vfma(x, splat(1.44269504088896341f), magic);
  const vfloat n = t - magic;
  vfloat r = vfma(n, splat(-0.693359375f), x);
  r = vfma(n, splat(2.12194440e-4f), r);
  vfloat q = splat(1.3879685e-3f);
  q = vfma(q, r, splat(8.3686942e-3f));
  q = vfma(q, r, splat(4.1667227e-2f));
  q = vfma(q, r, splat(1.6666521e-1f));
  q = vfma(q, r, splat(4.9999997e-1f));
  return {vfma(q, r * r, r) + 1.0f, as_float((as_uint(t) << 23) + (127u << 23))};
}

template <bool kClampHigh = false>
inline vfloat vexp(vfloat x) {
  const ExpParts e = vexp_parts<kClampHigh>(x);
  return e.y * e.pow2n;
}

// ---- forward ----

template <typename acc_t>
struct RowStats {
  acc_t lse;      // logsumexp(z), z = logits * scale
  acc_t entropy;  // lse - sum softmax(z) * z (0 when not asked)
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

// Max of x[0, len), NaN skipped (-inf when every value is -inf or NaN).
template <typename T>
inline float chunk_max(const T* x, int64_t len) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  vfloat m0 = splat(kNegInf), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * kWidth <= len; i += 2 * kWidth) {
    m0 = vmax(load(x + i), m0);
    m1 = vmax(load(x + i + kWidth), m1);
  }
  for (; i + kWidth <= len; i += kWidth) m0 = vmax(load(x + i), m0);
  if (i < len) m1 = vmax(load_partial(x + i, len - i, kNegInf), m1);
  return hmax(vmax(m0, m1));
}

template <typename T>
inline bool has_nan(const T* x, int64_t len) {
  for (int64_t i = 0; i < len; i += kWidth) {
    const vfloat v = i + kWidth <= len ? load(x + i) : load_partial(x + i, len - i, 0.0f);
    for (int k = 0; k < kWidth; ++k)
      if (v[k] != v[k]) return true;
  }
  return false;
}

// Sums exp(z - m) (and exp(z - m) * (z - m)) over the tokens of x[0, len) that `keep` keeps (x[i]
// is token first_id + i) into s, w, with z = x * scale rounded to float, the logit every pass and
// the backward use (so a one-value row has lse = z exactly and a gradient of exactly 0); prefetches
// `next` (the same span of the next row, or null) into L2 meanwhile. s is the same whether or not
// the entropy is asked for.
template <bool kEntropy, typename T, typename Keep = EveryToken>
inline void chunk_sums(const T* x, int64_t len, float scale, float m, const T* next, float& s, float& w,
                       const Keep& keep = Keep{}, int64_t first_id = 0) {
  const vfloat vs = splat(scale), vm = splat(m), zero = splat(0.0f);
  const vfloat dropped = splat(-std::numeric_limits<float>::infinity());  // exp gives 0, the select drops it
  vfloat s0 = zero, s1 = zero, w0 = zero, w1 = zero;  // two accumulators hide the add latency
  constexpr int64_t kStep = 2 * kWidth;
  int64_t i = 0;
  for (; i + kStep <= len; i += kStep) {
    if (next != nullptr) prefetch_l2(reinterpret_cast<const char*>(next + i), kStep * sizeof(T));
    const vfloat z0 = load(x + i) * vs, z1 = load(x + i + kWidth) * vs;
    vfloat d0 = z0 - vm, d1 = z1 - vm;
    if constexpr (!Keep::kEvery) {
      d0 = vselect(keep.keeps(z0, first_id + i), d0, dropped);
      d1 = vselect(keep.keeps(z1, first_id + i + kWidth), d1, dropped);
    }
    const ExpParts e0 = vexp_parts(d0), e1 = vexp_parts(d1);
    s0 = vfma(e0.y, e0.pow2n, s0);
    s1 = vfma(e1.y, e1.pow2n, s1);
    if (kEntropy) {
      // e * d is 0 * -inf = NaN on -inf logits; their share is 0.
      const vfloat p0 = e0.y * e0.pow2n, p1 = e1.y * e1.pow2n;
      w0 += vselect(p0 > zero, p0 * d0, zero);
      w1 += vselect(p1 > zero, p1 * d1, zero);
    }
  }
  for (; i < len; i += kWidth) {
    // The tail's padding is -inf: exp gives 0 and the entropy select drops it.
    const vfloat v = i + kWidth <= len ? load(x + i) : load_partial(x + i, len - i, -std::numeric_limits<float>::infinity());
    const vfloat z0 = v * vs;
    vfloat d0 = z0 - vm;
    if constexpr (!Keep::kEvery) d0 = vselect(keep.keeps(z0, first_id + i), d0, dropped);
    const ExpParts e0 = vexp_parts(d0);
    s0 = vfma(e0.y, e0.pow2n, s0);
    if (kEntropy) {
      const vfloat p0 = e0.y * e0.pow2n;
      w0 += vselect(p0 > zero, p0 * d0, zero);
    }
  }
  s = hsum(s0 + s1);
  w = kEntropy ? hsum(w0 + w1) : 0.0f;
}

// Logsumexp (and entropy) of one row of `vocab` values; `scale` = 1 / temperature > 0, so the max
// of x * scale is the max of x times scale (rounding is monotonic).
template <bool kEntropy, typename T>
inline RowStats<float> row_forward(const T* row, const T* next_row, int64_t vocab, float scale) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  OnlineState<float> st;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t len = std::min(kChunk, vocab - start);
    const T* x = row + start;
    float cmax = chunk_max(x, len) * scale;
    if (!(cmax > kNegInf)) {
      // Every value is -inf (masked vocabulary) or NaN; a NaN must still reach the sum.
      if (!has_nan(x, len)) continue;
      cmax = st.m > kNegInf ? st.m : 0.0f;
    }
    st.rescale_to(cmax);
    float s, w;
    chunk_sums<kEntropy>(x, len, scale, st.m, next_row ? next_row + start : nullptr, s, w);
    st.s += s;
    st.w += w;
  }
  return st.finish(kEntropy);
}

// ---- backward ----

// dz * scale of kWidth logits z = x * scale (see row_backward); g_scaled = -g_logp * scale, ge_scaled =
// -g_entropy * scale. kSelect writes 0 where p = 0 explicitly: needed when the factor of p can be
// infinite (the entropy term at a -inf logit; a non-finite g), else p * g is 0 there already.
template <bool kEntropy, bool kSelect>
inline vfloat softmax_grad(vfloat z, vfloat lse, vfloat g_scaled, vfloat ge_scaled, vfloat h) {
  const vfloat logp = z - lse;  // z rounded as in the forward
  const vfloat p = vexp<true>(logp);  // logp <= 0 when lse is this row's; clamped anyway
  // -p * (g_logp + g_entropy * (logp + H)) * scale
  const vfloat dz = kEntropy ? p * vfma(ge_scaled, logp + h, g_scaled) : p * g_scaled;
  return kSelect ? vselect(p > splat(0.0f), dz, splat(0.0f)) : dz;
}

// The gradient of row[0, vocab) into out. (Non-temporal stores into a fresh gradient measured
// slower, 95 against 82 ms for 262 MB of bf16 on one thread: the kernel has just zeroed the page
// through the cache.)
// Tokens that `keep` drops get exactly 0.
template <bool kEntropy, bool kSelect, typename T, typename Keep>
inline void grad_span(const T* row, const T* next_row, T* out, int64_t vocab, vfloat vs, vfloat vlse,
                      vfloat g_scaled, vfloat ge_scaled, vfloat h, const Keep& keep) {
  const auto grad = [&](vfloat z, int64_t first_id) {
    const vfloat dz = softmax_grad<kEntropy, kSelect>(z, vlse, g_scaled, ge_scaled, h);
    if constexpr (Keep::kEvery) return dz;
    return vselect(keep.keeps(z, first_id), dz, splat(0.0f));
  };
  int64_t i = 0;
  for (; i + kWidth <= vocab; i += kWidth) {
    if (next_row != nullptr) prefetch_l2(reinterpret_cast<const char*>(next_row + i), kWidth * sizeof(T));
    store(out + i, grad(load(row + i) * vs, i));
  }
  if (i < vocab) {
    const vfloat x = load_partial(row + i, vocab - i, -std::numeric_limits<float>::infinity());
    store_partial(out + i, vocab - i, grad(x * vs, i));
  }
}

// Gradient of one row: with z = x * scale, p = softmax(z), logp_j = z_j - lse, H the entropy,
//   dz_j = g_logp * (1[j == id] - p_j) - g_entropy * p_j * (logp_j + H),  dlogits_j = dz_j * scale.
// Under a sampling support (Keep = KeptTokens) p, lse and H are the kept tokens' and the dropped
// tokens get 0 (the onehot term too: a dropped target's logp is the constant -inf).
// `out` may alias `row` (in-place backward): each vector is read before it is written, and the
// target's logit is read first.
template <bool kEntropy, typename T, typename Keep = EveryToken>
inline void row_backward(const T* row, const T* next_row, T* out, int64_t vocab, int64_t id, float scale, float lse,
                         float entropy, float grad_logp, float grad_entropy, const Keep& keep = Keep{}) {
  if (grad_logp == 0 && (!kEntropy || grad_entropy == 0)) {
    // Masked-out tokens: their gradient is exactly zero (+0 bits), no need to touch the softmax.
    std::memset(static_cast<void*>(out), 0, vocab * sizeof(T));
    return;
  }
  const float target_z = load_one(row + id) * scale;
  const float target_logp = target_z - lse;
  const vfloat vs = splat(scale), vlse = splat(lse);
  const vfloat g_scaled = splat(-grad_logp * scale);  // -g_logp * scale
  const vfloat ge_scaled = splat(-grad_entropy * scale), h = splat(entropy);
  if (kEntropy || !std::isfinite(grad_logp * scale)) {
    grad_span<kEntropy, true>(row, next_row, out, vocab, vs, vlse, g_scaled, ge_scaled, h, keep);
  } else {
    grad_span<false, false>(row, next_row, out, vocab, vs, vlse, g_scaled, ge_scaled, h, keep);
  }
  if (!keep.keeps(target_z, id)) return;  // a dropped target: its 0 is written
  const float p_target = vexp<true>(splat(target_logp))[0];
  float dz_target = grad_logp * (1 - p_target);
  if (kEntropy && p_target > 0) dz_target -= grad_entropy * p_target * (target_logp + entropy);
  store_one(out + id, dz_target * scale);
}

// ---- the row loops behind CpuKernels ----

// Row r's cutoff from the (rows, 2) float64 cutoff tensor (cpu_kernels.h), where tie_end >= V keeps
// every tie.
template <typename acc_t>
inline KeptTokens<acc_t> kept_tokens_of(const double* cutoff, int64_t r, int64_t vocab) {
  const auto tie_end = static_cast<int64_t>(cutoff[kCutoffFields * r + 1]);
  return {static_cast<acc_t>(cutoff[kCutoffFields * r]), tie_end >= vocab ? kEveryTie : tie_end};
}

template <typename T>
void forward_rows(const ForwardJob& job, int64_t begin, int64_t end) {
  const T* base = static_cast<const T*>(job.logits);
  const RowLayout& lay = job.layout;
  const float scale = static_cast<float>(job.scale);
  float* logps = static_cast<float*>(job.logps);
  float* lse = static_cast<float*>(job.lse);
  float* entropy = static_cast<float*>(job.entropy_out);
  for (int64_t r = begin; r < end; ++r) {
    const T* row = base + lay.offset(r);
    const T* next = r + 1 < end ? base + lay.offset(r + 1) : nullptr;
    const RowStats<float> stats = job.entropy ? row_forward<true>(row, next, lay.vocab, scale)
                                              : row_forward<false>(row, next, lay.vocab, scale);
    lse[r] = stats.lse;
    logps[r] = load_one(row + job.ids[r]) * scale - stats.lse;
    if (job.entropy) entropy[r] = stats.entropy;
  }
}

template <typename T>
void backward_rows(const BackwardJob& job, int64_t begin, int64_t end) {
  const T* in = static_cast<const T*>(job.logits);
  T* out = static_cast<T*>(job.dlogits);
  const float scale = static_cast<float>(job.scale);
  const float* lse = static_cast<const float*>(job.lse);
  const float* entropy = static_cast<const float*>(job.entropy);
  const float* grad_logps = static_cast<const float*>(job.grad_logps);
  const float* grad_entropy = static_cast<const float*>(job.grad_entropy);
  const auto rows = [&](const auto& keep_of) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = in + job.layout.offset(r);
      const T* next = r + 1 < end ? in + job.layout.offset(r + 1) : nullptr;
      T* dst = out + job.out_layout.offset(r);
      if (grad_entropy != nullptr) {
        row_backward<true>(row, next, dst, job.layout.vocab, job.ids[r], scale, lse[r], entropy[r], grad_logps[r],
                           grad_entropy[r], keep_of(r));
      } else {
        row_backward<false>(row, next, dst, job.layout.vocab, job.ids[r], scale, lse[r], 0.0f, grad_logps[r], 0.0f,
                            keep_of(r));
      }
    }
  };
  if (job.cutoff == nullptr) {
    rows([](int64_t) { return EveryToken{}; });
  } else {
    rows([&](int64_t r) { return kept_tokens_of<float>(job.cutoff, r, job.layout.vocab); });
  }
}

#if defined(GRPO_FUSED_WITH_DOUBLE)
// ---- float64 (gradcheck): plain scalar loops, compiled in the baseline copy only, so every CPU
// runs the same code on them and gets the same bits ----

// The double path (fp64 inputs, gradcheck): plain loops.
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

template <bool kEntropy, typename Keep>
inline void row_backward_double(const double* row, double* out, int64_t vocab, int64_t id, double scale, double lse,
                                double entropy, double grad_logp, double grad_entropy, const Keep& keep) {
  if (grad_logp == 0 && (!kEntropy || grad_entropy == 0)) {
    for (int64_t j = 0; j < vocab; ++j) out[j] = 0.0;
    return;
  }
  const double target_z = row[id] * scale;
  const double target_logp = target_z - lse;
  for (int64_t j = 0; j < vocab; ++j) {
    const double z = row[j] * scale;
    const double logp = z - lse;
    const double p = std::exp(logp);
    const double coeff = kEntropy ? grad_logp + grad_entropy * (logp + entropy) : grad_logp;
    out[j] = p > 0 && keep.keeps(z, j) ? -p * coeff * scale : 0.0;
  }
  if (!keep.keeps(target_z, id)) return;
  const double p_target = std::exp(target_logp);
  double dz_target = grad_logp * (1 - p_target);
  if (kEntropy && p_target > 0) dz_target -= grad_entropy * p_target * (target_logp + entropy);
  out[id] = dz_target * scale;
}

template <>
void forward_rows<double>(const ForwardJob& job, int64_t begin, int64_t end) {
  const double* base = static_cast<const double*>(job.logits);
  double* logps = static_cast<double*>(job.logps);
  double* lse = static_cast<double*>(job.lse);
  double* entropy = static_cast<double*>(job.entropy_out);
  for (int64_t r = begin; r < end; ++r) {
    const double* row = base + job.layout.offset(r);
    const RowStats<double> stats = job.entropy ? row_forward_double<true>(row, job.layout.vocab, job.scale)
                                               : row_forward_double<false>(row, job.layout.vocab, job.scale);
    lse[r] = stats.lse;
    logps[r] = row[job.ids[r]] * job.scale - stats.lse;
    if (job.entropy) entropy[r] = stats.entropy;
  }
}

template <>
void backward_rows<double>(const BackwardJob& job, int64_t begin, int64_t end) {
  const double* in = static_cast<const double*>(job.logits);
  double* out = static_cast<double*>(job.dlogits);
  const double* lse = static_cast<const double*>(job.lse);
  const double* entropy = static_cast<const double*>(job.entropy);
  const double* grad_logps = static_cast<const double*>(job.grad_logps);
  const double* grad_entropy = static_cast<const double*>(job.grad_entropy);
  const auto rows = [&](const auto& keep_of) {
    for (int64_t r = begin; r < end; ++r) {
      const double* row = in + job.layout.offset(r);
      double* dst = out + job.out_layout.offset(r);
      if (grad_entropy != nullptr) {
        row_backward_double<true>(row, dst, job.layout.vocab, job.ids[r], job.scale, lse[r], entropy[r],
                                  grad_logps[r], grad_entropy[r], keep_of(r));
      } else {
        row_backward_double<false>(row, dst, job.layout.vocab, job.ids[r], job.scale, lse[r], 0.0, grad_logps[r],
                                   0.0, keep_of(r));
      }
    }
  };
  if (job.cutoff == nullptr) {
    rows([](int64_t) { return EveryToken{}; });
  } else {
    rows([&](int64_t r) { return kept_tokens_of<double>(job.cutoff, r, job.layout.vocab); });
  }
}

#endif  // GRPO_FUSED_WITH_DOUBLE

// The sampling support's cutoff search and its forward rows: the same per-instruction-set copy.
#include "sampling_support.h"

inline void forward(const ForwardJob& job, int64_t begin, int64_t end) {
  if (job.sampling != nullptr) return forward_support(job, begin, end);
  switch (job.elem) {
    case Elem::kFloat: return forward_rows<float>(job, begin, end);
#if defined(GRPO_FUSED_WITH_DOUBLE)
    case Elem::kDouble: return forward_rows<double>(job, begin, end);
#else
    case Elem::kDouble: return kernels_baseline()->forward(job, begin, end);
#endif
    case Elem::kBFloat16: return forward_rows<BF16>(job, begin, end);
    case Elem::kHalf: return forward_rows<F16>(job, begin, end);
  }
}

inline void backward(const BackwardJob& job, int64_t begin, int64_t end) {
  switch (job.elem) {
    case Elem::kFloat: return backward_rows<float>(job, begin, end);
#if defined(GRPO_FUSED_WITH_DOUBLE)
    case Elem::kDouble: return backward_rows<double>(job, begin, end);
#else
    case Elem::kDouble: return kernels_baseline()->backward(job, begin, end);
#endif
    case Elem::kBFloat16: return backward_rows<BF16>(job, begin, end);
    case Elem::kHalf: return backward_rows<F16>(job, begin, end);
  }
}

}  // namespace GRPO_FUSED_ISA
}  // namespace grpo_fused_cpp
