// Sampling support: each row's cutoff under the sampler's truncation (grpo_fused.semantics.SamplingRule,
// vLLM's V1 sampler), and the forward rows that run the softmax over the kept tokens only.
//
// Part of the per-instruction-set row kernels: row_math.h includes this file inside its namespace
// (GRPO_FUSED_ISA), after the vector helpers, vexp, chunk_sums and KeptTokens it uses.
//
// The rule's stages (min-p, then top-k, then top-p on the survivors) each keep a prefix of the order
// "z descending, then token id ascending", so the support of a row is one cutoff (tau, tie_end),
// KeptTokens: token v is kept when z[v] > tau, or z[v] == tau and v < tie_end. It is found with a
// bounded number of sweeps over the row, which stays in L2 between them (V = 151936 fp32 is 594 KiB),
// and kCandidateCap candidates of per-thread scratch (4 KiB); no sort of the row, no (N, V) mask.
//
//   1. Sweep 1 (from memory): max z, whether a NaN is present (a NaN row keeps nothing and gives NaN
//      log-probs and entropy; a row of -inf keeps every token), and a seed for sweep 2: a value at
//      least kSeedCount tokens reach (each vector lane's 4 largest values, kept while the row streams in).
//   2. min-p keeps z - max z >= log(min_p): the smallest z that passes is found by bisection over the
//      float keys below max z (32 scalar steps, no sweep) and is the survivors' cutoff (tau, every tie).
//   3. Sweep 2 (from L2, the next row prefetched meanwhile): the best survivors by value, streamed into
//      the scratch (a vector compare against a threshold that starts at the seed and rises as the
//      scratch fills, so a few hundred of V tokens are ever copied), and for top-p without top-k the
//      survivors' total mass.
//      When top-k's k and the top-p set fit in kStreamKeep tokens (the usual case: an LLM's top-p set
//      is tens of tokens), the cutoff follows from the sorted candidates, and so do the kept tokens'
//      sum of exp(z - max z) and entropy term: no further sweep.
//   4. Otherwise (k > kStreamKeep, a flat row whose top-p set is larger, more ties at the threshold
//      than the scratch holds) a bounded search per stage, "keep a survivor while the count (top-k) or
//      mass (top-p) of the survivors before it is below the target", narrows an interval of order keys
//      (the order-preserving uint32 of the fp32 z; uint64 for fp64) that holds the boundary token:
//        - a "ladder" sweep counts (top-k) or sums the mass of (top-p) the survivors at or above 15
//          fixed values below max z, in vector registers: 16 buckets;
//        - each later sweep builds a 256-bucket histogram of the survivors in the interval, 8 bits of the
//          key at a time, so after at most 4 of them the interval is one value;
//        - an interval of at most kCandidateCap survivors is gathered and sorted instead, and one tied
//          value is resolved arithmetically (its tokens have one mass), with one more sweep for the id
//          of the first dropped tie when only some are kept;
//      then one sweep sums the kept tokens' softmax.
//   Bound per row: 2 sweeps plus the top-k and top-p searches (1 + 4 + 1 each) and the final sum: at
//   most 2 + 6 + 6 + 1 = 15 sweeps (fp64: 23, 8-bit digits of 64-bit keys); 2 in the usual case.
//
// The z of every sweep is the one the vocabulary pass computes (x * scale rounded to the compute type),
// so a tie seen here is a tie there. Masses are summed in the compute type (fp32 for fp32 / bf16 / fp16
// rows): a token whose preceding mass lies within rounding of p may fall on the other side than in the
// float64 reference; min-p compares z - max z with log(min_p) in the compute type, as the reference does.

#ifndef GRPO_FUSED_ISA
#error "sampling_support.h is part of the row kernels: row_math.h includes it"
#endif

// ---- order keys ----

// The order-preserving key of a value: a < b iff key(a) < key(b) for any non-NaN a, b; -0 and +0 (equal,
// so tied) share the key of +0.
inline uint32_t order_key(float z) {
  z += 0.0f;  // -0 -> +0
  uint32_t u;
  std::memcpy(&u, &z, sizeof u);
  return u ^ ((u >> 31) != 0 ? 0xFFFFFFFFu : 0x80000000u);
}
inline uint64_t order_key(double z) {
  z += 0.0;
  uint64_t u;
  std::memcpy(&u, &z, sizeof u);
  return u ^ ((u >> 63) != 0 ? ~uint64_t{0} : uint64_t{1} << 63);
}
inline vuint order_key(vfloat z) {
  const vuint u = as_uint(z + 0.0f);
  return u ^ ((vuint)((vint)u >> 31) | 0x80000000u);
}

template <typename acc_t>
inline acc_t value_of_key(uint64_t key);
template <>
inline float value_of_key<float>(uint64_t key) {
  const uint32_t k = static_cast<uint32_t>(key);
  const uint32_t u = (k >> 31) != 0 ? k ^ 0x80000000u : ~k;
  float z;
  std::memcpy(&z, &u, sizeof z);
  return z;
}
template <>
inline double value_of_key<double>(uint64_t key) {
  const uint64_t u = (key >> 63) != 0 ? key ^ (uint64_t{1} << 63) : ~key;
  double z;
  std::memcpy(&z, &u, sizeof z);
  return z;
}

// ---- sizes ----

constexpr int64_t kCandidateCap = 512;  // scratch candidates per thread
constexpr int64_t kStreamKeep = 256;    // the stream keeps this many best survivors (ties beyond): room to refill
constexpr int kLadder = 15;             // values of a search's first sweep: max z plus these offsets
constexpr float kLadderOffsets[kLadder] = {0.0f,  -0.5f, -1.0f, -1.5f, -2.0f, -2.5f,  -3.0f, -3.5f,
                                           -4.0f, -5.0f, -6.0f, -8.0f, -11.0f, -16.0f, -24.0f};
constexpr int kHistogramBits = 8;  // a later sweep splits the interval's keys into 256 buckets
constexpr int kSeedRanks = 4;      // sweep 1 keeps each lane's 4 largest values for the stream's seed

// ---- the sweeps over one row ----

// A candidate token (z, id) of float rows in one uint64 whose ascending order is the rule's order:
// the complemented key of z above, the id below.
struct PackedCandidates {
  using Candidate = uint64_t;
  static Candidate pack(float z, int64_t id) {
    return (uint64_t{~order_key(z)} << 32) | static_cast<uint32_t>(id);
  }
  static uint64_t rank(Candidate c) { return c >> 32; }  // smaller: larger z
  static int64_t id_of(Candidate c) { return static_cast<int64_t>(c & 0xFFFFFFFFu); }
  static float z_of(Candidate c) { return value_of_key<float>(~rank(c) & 0xFFFFFFFFu); }
};

// The sweeps over a row of float-accumulated logits (T = float, BF16, F16), kWidth tokens a vector.
template <typename T>
struct FloatRowScan : PackedCandidates {
  using acc_t = float;
  const T* row;
  const T* next_row;  // prefetched into L2 during the stream (null: none)
  int64_t vocab;
  float scale;
  float zmax = -std::numeric_limits<float>::infinity();
  bool has_nan = false;
  float seed = -std::numeric_limits<float>::infinity();  // at least kSeedCount tokens have z >= seed
  static constexpr int64_t kSeedCount = kSeedRanks * 2 * kWidth;

  float z_at(int64_t id) const { return load_one(row + id) * scale; }
  // exp(z - max z) as the sweeps compute it (vexp, lane by lane).
  float mass_of(float z) const { return vexp(splat(z - zmax))[0]; }

  // f(z, first id, valid lanes) for every kWidth tokens while it returns true; the tail's invalid
  // lanes hold z = 0.
  template <typename F>
  void for_each_vector(F&& f) const {
    const vfloat vs = splat(scale);
    const vint every_lane = vint{} - 1;
    int64_t i = 0;
    for (; i + kWidth <= vocab; i += kWidth) {
      if (!f(load(row + i) * vs, i, every_lane)) return;
    }
    if (i < vocab) f(load_partial(row + i, vocab - i, 0.0f) * vs, i, lane_index() < static_cast<int32_t>(vocab - i));
  }

  // Sweep 1: max z (the max of x times scale, as the vocabulary pass takes it), NaN presence, and the
  // stream's seed: the kSeedRanks largest values of each of 2 * kWidth strided lanes (an insertion
  // network, free while the row streams in from memory); at least kSeedCount tokens are at or above the
  // least of the lanes' last ranks.
  void find_max() {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    vfloat top0[kSeedRanks], top1[kSeedRanks];  // per lane, descending; top*[0] is the lane's max
    for (int j = 0; j < kSeedRanks; ++j) top0[j] = top1[j] = splat(kNegInf);
    vint nan = vint{};
    const auto insert = [](vfloat* top, vfloat x) {
      for (int j = 0; j < kSeedRanks; ++j) {  // vmax / vmin keep their second operand on NaN
        const vfloat larger = vmax(x, top[j]);
        x = vmin(x, top[j]);
        top[j] = larger;
      }
    };
    int64_t i = 0;
    for (; i + 2 * kWidth <= vocab; i += 2 * kWidth) {
      const vfloat a = load(row + i), b = load(row + i + kWidth);
      insert(top0, a);
      insert(top1, b);
      nan |= (a != a) | (b != b);
    }
    for (; i < vocab; i += kWidth) {
      const vfloat a = i + kWidth <= vocab ? load(row + i) : load_partial(row + i, vocab - i, kNegInf);
      insert(top0, a);
      nan |= a != a;
    }
    zmax = hmax(vmax(top0[0], top1[0])) * scale;
    has_nan = lane_bits(nan) != 0;
    const vfloat last = vmin(top0[kSeedRanks - 1], top1[kSeedRanks - 1]);
    float least = last[0];
    for (int l = 1; l < kWidth; ++l) least = last[l] < least ? last[l] : least;
    seed = least * scale;
  }

  // Sweep 2: appends pack(z, id) of every survivor with z >= threshold to c[n...], the threshold starting
  // at `threshold`; when fewer than kWidth slots are left it calls make_room(n, threshold), which drops
  // candidates and raises the threshold, or returns false when it cannot (the sweep then stops and
  // returns false). kMass: *survivors_mass = the survivors' sum of exp(z - max z).
  template <bool kMass, typename MakeRoom>
  bool stream(const KeptTokens<float>& survivors, float threshold, Candidate* c, int64_t& n, MakeRoom&& make_room,
              float* survivors_mass) const {
    const vfloat vmax_z = splat(zmax), zero = splat(0.0f);
    vfloat vthreshold = splat(threshold), mass = zero;
    bool room = true;
    for_each_vector([&](vfloat z, int64_t first, vint valid) {
      if (next_row != nullptr) prefetch_l2(reinterpret_cast<const char*>(next_row + first), kWidth * sizeof(T));
      const vint in = valid & survivors.keeps(z, first);
      if (kMass) mass += vselect(in, vexp(z - vmax_z), zero);
      uint32_t bits = lane_bits(in & (z >= vthreshold));
      if (bits == 0) return true;
      if (n + kWidth > kCandidateCap) {
        room = make_room(n, threshold);
        if (!room) return false;
        vthreshold = splat(threshold);
        bits = lane_bits(in & (z >= vthreshold));
      }
      for (; bits != 0; bits &= bits - 1) {
        const int lane = __builtin_ctz(bits);
        c[n++] = pack(z[lane], first + lane);
      }
      return true;
    });
    if (kMass) *survivors_mass = hsum(mass);
    return room;
  }

  // Sweep: the survivors with z >= thresholds[j] (j < kLadder), and every survivor (j = kLadder): their
  // count (kMass false, counts) or their mass (kMass true, masses). One of the two: 16 accumulators of
  // each would not fit the 32 vector registers of AVX-512 (the spills measured 2x slower).
  template <bool kMass>
  void ladder(const KeptTokens<float>& survivors, const float* thresholds, int64_t* counts, float* masses) const {
    vint c[kLadder + 1];
    vfloat m[kLadder + 1];
    for (int j = 0; j <= kLadder; ++j) {
      c[j] = vint{};
      m[j] = splat(0.0f);
    }
    const vfloat vmax_z = splat(zmax), zero = splat(0.0f);
    for_each_vector([&](vfloat z, int64_t first, vint valid) {
      const vint in = valid & survivors.keeps(z, first);
      vfloat e = zero;
      if (kMass) {
        e = vselect(in, vexp(z - vmax_z), zero);
        m[kLadder] += e;
      } else {
        c[kLadder] -= in;
      }
#if GRPO_FUSED_VEC_BYTES == 64
      // Compares into mask registers and masked adds: 2 instructions a threshold.
      const __mmask16 in_mask = _mm512_movepi32_mask((__m512i)in);
      for (int j = 0; j < kLadder; ++j) {
        const __mmask16 above = _mm512_mask_cmp_ps_mask(in_mask, (__m512)z, _mm512_set1_ps(thresholds[j]), _CMP_GE_OQ);
        if (kMass) {
          m[j] = (vfloat)_mm512_mask_add_ps((__m512)m[j], above, (__m512)m[j], (__m512)e);
        } else {
          c[j] = (vint)_mm512_mask_sub_epi32((__m512i)c[j], above, (__m512i)c[j], _mm512_set1_epi32(-1));
        }
      }
#else
      for (int j = 0; j < kLadder; ++j) {
        const vint above = z >= splat(thresholds[j]);
        if (kMass) {
          m[j] += vselect(above, e, zero);
        } else {
          c[j] -= in & above;
        }
      }
#endif
      return true;
    });
    for (int j = 0; j <= kLadder; ++j) {
      if (kMass) {
        masses[j] = hsum(m[j]);
      } else {
        counts[j] = hsum(c[j]);
      }
    }
  }

  // Sweep: count / mass of the survivors with key in [key_lo, key_hi), by bucket (key - key_lo) >> shift.
  template <bool kMass>
  void histogram(const KeptTokens<float>& survivors, uint64_t key_lo, uint64_t key_hi, int shift, int64_t* counts,
                 float* masses) const {
    const vuint vlo = usplat(static_cast<uint32_t>(key_lo)), vhi = usplat(static_cast<uint32_t>(key_hi));
    const vfloat vmax_z = splat(zmax);
    int32_t counts32[1 << kHistogramBits] = {};
#if GRPO_FUSED_VEC_BYTES == 64
    // The interval's lanes are compressed into a batch and counted by a loop of known length: the
    // per-lane loop's unpredictable exits measured 2-3x slower.
    constexpr int kBatch = 256;
    uint32_t batch_bucket[kBatch + 16];
    float batch_mass[kBatch + 16];
    int batched = 0;
    const auto flush = [&] {
      for (int i = 0; i < batched; ++i) {
        ++counts32[batch_bucket[i]];
        if (kMass) masses[batch_bucket[i]] += batch_mass[i];
      }
      batched = 0;
    };
    for_each_vector([&](vfloat z, int64_t first, vint valid) {
      const vuint key = order_key(z);
      const __mmask16 in =
          _mm512_movepi32_mask((__m512i)(valid & (vint)(key >= vlo) & (vint)(key < vhi) & survivors.keeps(z, first)));
      if (in == 0) return true;
      _mm512_storeu_si512(batch_bucket + batched, _mm512_maskz_compress_epi32(in, (__m512i)((key - vlo) >> shift)));
      if (kMass) _mm512_storeu_ps(batch_mass + batched, _mm512_maskz_compress_ps(in, (__m512)vexp(z - vmax_z)));
      batched += __builtin_popcount(in);
      if (batched >= kBatch) flush();
      return true;
    });
    flush();
#else
    for_each_vector([&](vfloat z, int64_t first, vint valid) {
      const vuint key = order_key(z);
      uint32_t bits = lane_bits(valid & (vint)(key >= vlo) & (vint)(key < vhi) & survivors.keeps(z, first));
      if (bits == 0) return true;
      vfloat e{};
      if (kMass) e = vexp(z - vmax_z);
      const vuint bucket = (key - vlo) >> shift;
      for (; bits != 0; bits &= bits - 1) {
        const int lane = __builtin_ctz(bits);
        ++counts32[bucket[lane]];
        if (kMass) masses[bucket[lane]] += e[lane];
      }
      return true;
    });
#endif
    for (int b = 0; b < (1 << kHistogramBits); ++b) counts[b] += counts32[b];
  }

  // Sweep: the survivors with key in [key_lo, key_hi), at most kCandidateCap; returns how many.
  int64_t gather(const KeptTokens<float>& survivors, uint64_t key_lo, uint64_t key_hi, Candidate* c) const {
    const vuint vlo = usplat(static_cast<uint32_t>(key_lo)), vhi = usplat(static_cast<uint32_t>(key_hi));
    int64_t n = 0;
    for_each_vector([&](vfloat z, int64_t first, vint valid) {
      const vuint key = order_key(z);
      for (uint32_t bits = lane_bits(valid & (vint)(key >= vlo) & (vint)(key < vhi) & survivors.keeps(z, first));
           bits != 0 && n < kCandidateCap; bits &= bits - 1) {
        const int lane = __builtin_ctz(bits);
        c[n++] = pack(z[lane], first + lane);
      }
      return true;
    });
    return n;
  }

  // Sweep (stops early): the id of the survivor with z == tau that has n such survivors before it.
  int64_t nth_tie_id(const KeptTokens<float>& survivors, float tau, int64_t n) const {
    const vfloat vtau = splat(tau);
    int64_t seen = 0, found = vocab;
    for_each_vector([&](vfloat z, int64_t first, vint valid) {
      uint32_t bits = lane_bits(valid & (z == vtau) & survivors.keeps(z, first));
      const int count = __builtin_popcount(bits);
      if (seen + count <= n) {
        seen += count;
        return true;
      }
      for (int64_t skip = n - seen; skip > 0; --skip) bits &= bits - 1;
      found = first + __builtin_ctz(bits);
      return false;
    });
    return found;
  }

  // Sweep: the kept tokens' sum of exp(z - max z) and of exp(z - max z) (z - max z) (the entropy's).
  template <bool kEntropy>
  void kept_sums(const KeptTokens<float>& kept, float& s, float& w) const {
    chunk_sums<kEntropy>(row, vocab, scale, zmax, next_row, s, w, kept);
  }
};

#if defined(GRPO_FUSED_WITH_DOUBLE)
// The same sweeps over a float64 row (gradcheck), one token at a time.
struct DoubleRowScan {
  using acc_t = double;
  struct Candidate {
    uint64_t rank;  // complemented key: smaller is larger z
    int64_t id;
    bool operator<(const Candidate& o) const { return rank != o.rank ? rank < o.rank : id < o.id; }
  };
  static Candidate pack(double z, int64_t id) { return {~order_key(z), id}; }
  static uint64_t rank(const Candidate& c) { return c.rank; }
  static int64_t id_of(const Candidate& c) { return c.id; }
  static double z_of(const Candidate& c) { return value_of_key<double>(~c.rank); }

  const double* row;
  const double* next_row;  // unused: the scalar path does not prefetch
  int64_t vocab;
  double scale;
  double zmax = -std::numeric_limits<double>::infinity();
  bool has_nan = false;
  double seed = -std::numeric_limits<double>::infinity();  // no seed: the stream starts from every survivor
  static constexpr int64_t kSeedCount = 0;

  double z_at(int64_t id) const { return row[id] * scale; }
  double mass_of(double z) const { return std::exp(z - zmax); }

  void find_max() {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < vocab; ++j) {
      if (row[j] != row[j]) has_nan = true;
      m = row[j] > m ? row[j] : m;
    }
    zmax = m * scale;
  }

  template <bool kMass, typename MakeRoom>
  bool stream(const KeptTokens<double>& survivors, double threshold, Candidate* c, int64_t& n, MakeRoom&& make_room,
              double* survivors_mass) const {
    double mass = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double z = z_at(v);
      if (!survivors.keeps(z, v)) continue;
      if (kMass) mass += mass_of(z);
      if (!(z >= threshold)) continue;
      if (n == kCandidateCap) {
        if (!make_room(n, threshold)) return false;
        if (!(z >= threshold)) continue;
      }
      c[n++] = pack(z, v);
    }
    if (kMass) *survivors_mass = mass;
    return true;
  }

  template <bool kMass>
  void ladder(const KeptTokens<double>& survivors, const double* thresholds, int64_t* counts, double* masses) const {
    std::fill(counts, counts + kLadder + 1, int64_t{0});
    std::fill(masses, masses + kLadder + 1, 0.0);
    for (int64_t v = 0; v < vocab; ++v) {
      const double z = z_at(v);
      if (!survivors.keeps(z, v)) continue;
      const double e = kMass ? mass_of(z) : 0.0;  // counts and masses both: the contract asks one
      for (int j = 0; j < kLadder; ++j) {
        if (z >= thresholds[j]) {
          ++counts[j];
          masses[j] += e;
        }
      }
      ++counts[kLadder];
      masses[kLadder] += e;
    }
  }

  template <bool kMass>
  void histogram(const KeptTokens<double>& survivors, uint64_t key_lo, uint64_t key_hi, int shift, int64_t* counts,
                 double* masses) const {
    for (int64_t v = 0; v < vocab; ++v) {
      const double z = z_at(v);
      const uint64_t key = order_key(z);
      if (key < key_lo || key >= key_hi || !survivors.keeps(z, v)) continue;
      const uint64_t bucket = (key - key_lo) >> shift;
      ++counts[bucket];
      if (kMass) masses[bucket] += mass_of(z);
    }
  }

  int64_t gather(const KeptTokens<double>& survivors, uint64_t key_lo, uint64_t key_hi, Candidate* c) const {
    int64_t n = 0;
    for (int64_t v = 0; v < vocab && n < kCandidateCap; ++v) {
      const double z = z_at(v);
      const uint64_t key = order_key(z);
      if (key >= key_lo && key < key_hi && survivors.keeps(z, v)) c[n++] = pack(z, v);
    }
    return n;
  }

  int64_t nth_tie_id(const KeptTokens<double>& survivors, double tau, int64_t n) const {
    for (int64_t v = 0; v < vocab; ++v) {
      const double z = z_at(v);
      if (z == tau && survivors.keeps(z, v) && n-- == 0) return v;
    }
    return vocab;
  }

  template <bool kEntropy>
  void kept_sums(const KeptTokens<double>& kept, double& s, double& w) const {
    s = w = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double z = z_at(v);
      if (!kept.keeps(z, v)) continue;
      const double e = mass_of(z);
      s += e;
      if (kEntropy && e > 0) w += e * (z - zmax);
    }
  }
};
#endif  // GRPO_FUSED_WITH_DOUBLE

// ---- the boundary among sorted candidates ----

template <typename acc_t>
struct Walk {
  KeptTokens<acc_t> cutoff;
  int64_t kept;          // candidates kept: a prefix of them
  bool reached_target;   // some candidate was dropped, or the kept ones reach the target
};

// c[0, n) sorted in the rule's order follow `count_above` / `mass_above` survivors (all kept); mass[i] is
// c[i]'s. Keeps c[i] while the count (kMass false: top-k) or mass (top-p) before it is below the target;
// c[0] is always kept (the callers' candidates hold the boundary). With all_ties the tokens tied with the
// last kept one are kept too. `survivors` is the stage's input support, for the ties of its own cutoff.
template <bool kMass, typename Scan>
Walk<typename Scan::acc_t> walk_candidates(const Scan& scan, const typename Scan::Candidate* c,
                                          const typename Scan::acc_t* mass, int64_t n, int64_t count_above,
                                          typename Scan::acc_t mass_above, int64_t target_count,
                                          typename Scan::acc_t target_mass, bool all_ties,
                                          const KeptTokens<typename Scan::acc_t>& survivors) {
  using acc_t = typename Scan::acc_t;
  const auto below_target = [&](int64_t count, acc_t m) { return kMass ? m < target_mass : count < target_count; };
  int64_t last = 0, count = count_above;
  acc_t m = mass_above;
  bool dropped = false;
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0 && !below_target(count, m)) {
      dropped = true;
      break;
    }
    last = i;
    ++count;
    if (kMass) m += mass[i];
  }
  const acc_t tau = Scan::z_of(c[last]);
  const auto every_tie = [&] { return tau == survivors.tau ? survivors.tie_end : kEveryTie; };
  int64_t kept = last + 1, tie_end;
  if (all_ties) {
    while (kept < n && Scan::rank(c[kept]) == Scan::rank(c[last])) ++kept;
    tie_end = every_tie();
  } else if (kept < n && Scan::rank(c[kept]) == Scan::rank(c[last])) {
    tie_end = Scan::id_of(c[kept]);  // the first tie that is dropped
  } else {
    tie_end = every_tie();
  }
  return {{tau, tie_end}, kept, dropped || !below_target(count, m)};
}

// ---- the bounded search of one stage (when the streamed candidates cannot settle it) ----

template <typename acc_t>
struct StageResult {
  KeptTokens<acc_t> cutoff;
  int64_t count;  // tokens kept (top-k; a top-p stage, always the last, does not track it)
};

// kMass false: top-k, keep the first k survivors (with all_ties, every token tied with the k-th too).
// kMass true: top-p, keep each survivor whose preceding mass is below p times the survivors' mass.
// `survivors_count` is the number of survivors, or -1 when not known.
template <bool kMass, typename Scan>
class Stage {
 public:
  using acc_t = typename Scan::acc_t;
  using Cut = KeptTokens<acc_t>;
  using Candidate = typename Scan::Candidate;

  Stage(const Scan& scan, const Cut& survivors, int64_t survivors_count, double k_or_p, bool all_ties,
        Candidate* scratch)
      : scan_(scan), survivors_(survivors), count_in_(survivors_count), k_or_p_(k_or_p), all_ties_(all_ties),
        scratch_(scratch) {
    if (!kMass) target_count_ = static_cast<int64_t>(k_or_p);
  }

  StageResult<acc_t> run() {
    if (!kMass && count_in_ >= 0 && count_in_ <= target_count_) return {survivors_, count_in_};
    // The interval starts as every non-NaN value.
    key_lo_ = order_key(-std::numeric_limits<acc_t>::infinity());
    key_hi_ = order_key(std::numeric_limits<acc_t>::infinity()) + 1;
    for (bool first = true;; first = false) {
      if (count_in_ >= 0 && count_in_ <= kCandidateCap) return resolve_gathered();
      if (count_in_ >= 0 && key_hi_ - key_lo_ == 1) return resolve_tied_value();
      // Bucket b holds keys [bounds[b + 1], bounds[b]), in descending order; counts / masses are those of
      // the interval's survivors in buckets 0..b (cumulative: the ladder's sums are used as they are).
      int64_t counts[1 << kHistogramBits];
      acc_t masses[1 << kHistogramBits];
      uint64_t bounds[(1 << kHistogramBits) + 1];
      const int buckets = first ? ladder_buckets(counts, masses, bounds) : histogram_buckets(counts, masses, bounds);
      if (first) {  // the first sweep sees every survivor
        if (!kMass && counts[buckets - 1] <= target_count_) return {survivors_, counts[buckets - 1]};
        set_target(masses[buckets - 1]);
      }
      const int b = pick_bucket(counts, masses, buckets, /*counts_known=*/!(first && kMass));
      every_survivor_ = false;
      key_hi_ = bounds[b];
      key_lo_ = bounds[b + 1];
      // The mass ladder does not count: a histogram sweep follows and counts.
      count_in_ = first && kMass ? -1 : counts[b] - (b > 0 ? counts[b - 1] : 0);
    }
  }

 private:
  void set_target(acc_t total_mass) {
    if (kMass) target_mass_ = static_cast<acc_t>(k_or_p_) * total_mass;
  }
  // Whether the quantity before a token, above_ plus `count` / `mass` more, is still below the target.
  bool below_target(int64_t count, acc_t mass) const {
    return kMass ? above_mass_ + mass < target_mass_ : above_count_ + count < target_count_;
  }

  // The first sweep: 16 buckets by the fixed values below max z.
  int ladder_buckets(int64_t* counts, acc_t* masses, uint64_t* bounds) const {
    acc_t thresholds[kLadder];
    for (int j = 0; j < kLadder; ++j) thresholds[j] = scan_.zmax + static_cast<acc_t>(kLadderOffsets[j]);
    scan_.template ladder<kMass>(survivors_, thresholds, counts, masses);
    bounds[0] = key_hi_;
    for (int j = 0; j <= kLadder; ++j) bounds[j + 1] = j < kLadder ? order_key(thresholds[j]) : key_lo_;
    return kLadder + 1;
  }

  // A later sweep: up to 256 buckets of equal key width over [key_lo_, key_hi_).
  int histogram_buckets(int64_t* counts, acc_t* masses, uint64_t* bounds) const {
    const uint64_t span = key_hi_ - key_lo_;
    int bits = 0;
    while (bits < 64 && ((span - 1) >> bits) != 0) ++bits;
    const int shift = bits > kHistogramBits ? bits - kHistogramBits : 0;
    const int buckets = static_cast<int>(((span - 1) >> shift) + 1);
    int64_t ascending_counts[1 << kHistogramBits] = {};
    acc_t ascending_masses[1 << kHistogramBits] = {};
    scan_.template histogram<kMass>(survivors_, key_lo_, key_hi_, shift, ascending_counts, ascending_masses);
    for (int b = 0; b < buckets; ++b) {  // descending order of key, cumulative
      const int a = buckets - 1 - b;
      counts[b] = ascending_counts[a] + (b > 0 ? counts[b - 1] : 0);
      masses[b] = ascending_masses[a] + (b > 0 ? masses[b - 1] : acc_t(0));
      bounds[b] = std::min(key_hi_, key_lo_ + (static_cast<uint64_t>(a + 1) << shift));
    }
    bounds[buckets] = key_lo_;
    return buckets;
  }

  // The bucket that holds the boundary (the last kept token), from the cumulative counts / masses: the
  // first non-empty one whose tokens take the quantity to the target. The buckets above it are kept whole
  // (added to above_). When none reaches the target (top-p, when the sums round below p times their
  // total), the lowest non-empty one: every token of the interval is kept. Without counts (the mass
  // ladder) a bucket is empty when it adds no mass, and the count above is not tracked (top-p needs none).
  int pick_bucket(const int64_t* counts, const acc_t* masses, int buckets, bool counts_known) {
    int chosen = -1;
    for (int b = 0; b < buckets; ++b) {
      const bool empty = counts_known ? counts[b] == (b > 0 ? counts[b - 1] : 0)
                                      : !(masses[b] > (b > 0 ? masses[b - 1] : acc_t(0)));
      if (empty) continue;
      chosen = b;
      if (!below_target(counts_known ? counts[b] : 0, masses[b])) break;
    }
    if (chosen > 0) {
      if (counts_known) above_count_ += counts[chosen - 1];
      above_mass_ += masses[chosen - 1];
    }
    return chosen < 0 ? 0 : chosen;
  }

  // At most kCandidateCap survivors in the interval: sort them and walk.
  StageResult<acc_t> resolve_gathered() {
    Candidate* c = scratch_;
    const int64_t n = scan_.gather(survivors_, key_lo_, key_hi_, c);
    std::sort(c, c + n);
    acc_t mass[kCandidateCap];
    acc_t total_mass = 0;
    for (int64_t i = 0; i < n; ++i) {
      mass[i] = kMass ? scan_.mass_of(Scan::z_of(c[i])) : acc_t(0);
      total_mass += mass[i];
    }
    if (every_survivor_) {  // the interval was never narrowed: it holds every survivor
      if (!kMass && n <= target_count_) return {survivors_, n};
      set_target(total_mass);
    }
    if (n == 0) return {survivors_, above_count_};  // not reached: the interval holds the boundary
    const Walk<acc_t> walk = walk_candidates<kMass>(scan_, c, mass, n, above_count_, above_mass_, target_count_,
                                                    target_mass_, all_ties_, survivors_);
    return {walk.cutoff, above_count_ + walk.kept};
  }

  // One value left, held by count_in_ > kCandidateCap survivors of one mass: how many of them are kept
  // is arithmetic; the id of the first dropped one takes one more sweep.
  StageResult<acc_t> resolve_tied_value() {
    const acc_t tau = value_of_key<acc_t>(key_lo_);
    const int64_t n = count_in_;
    int64_t kept;
    if (all_ties_) {
      kept = n;
    } else if (kMass) {
      const acc_t mass = scan_.mass_of(tau);
      const double room = (static_cast<double>(target_mass_) - above_mass_) / mass;  // tokens that fit
      kept = room >= static_cast<double>(n) ? n : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(room)));
    } else {
      kept = std::max<int64_t>(1, std::min<int64_t>(n, target_count_ - above_count_));
    }
    const int64_t every_tie = tau == survivors_.tau ? survivors_.tie_end : kEveryTie;
    const int64_t tie_end = kept == n ? every_tie : scan_.nth_tie_id(survivors_, tau, kept);
    return {{tau, tie_end}, above_count_ + kept};
  }

  const Scan& scan_;
  const Cut survivors_;
  int64_t count_in_;  // survivors in [key_lo_, key_hi_), -1 when not known
  const double k_or_p_;
  const bool all_ties_;
  Candidate* scratch_;  // kCandidateCap
  int64_t target_count_ = 0;
  acc_t target_mass_ = std::numeric_limits<acc_t>::quiet_NaN();  // set from the survivors' mass
  uint64_t key_lo_ = 0, key_hi_ = 0;
  bool every_survivor_ = true;  // [key_lo_, key_hi_) is still every value
  int64_t above_count_ = 0;     // survivors above key_hi_ (kept)
  acc_t above_mass_ = 0;
};

// ---- the row's support ----

// min-p's survivors: z with z - max z >= log_min_p (rounded as the reference rounds it), a prefix of
// the order. The smallest such z, by bisection over the keys of [-inf, max z].
template <typename acc_t>
inline acc_t min_p_threshold(acc_t zmax, acc_t log_min_p) {
  const auto passes = [&](uint64_t key) { return value_of_key<acc_t>(key) - zmax >= log_min_p; };
  uint64_t fails = order_key(-std::numeric_limits<acc_t>::infinity()), holds = order_key(zmax);
  if (passes(fails)) return -std::numeric_limits<acc_t>::infinity();
  while (holds - fails > 1) {
    const uint64_t mid = fails + (holds - fails) / 2;
    (passes(mid) ? holds : fails) = mid;
  }
  return value_of_key<acc_t>(holds);
}

// Keeps the `keep` best candidates of c[0, n) and those tied with the last of them (in any order); sets
// `threshold` to that value. False when the ties leave fewer than kWidth free slots.
template <typename Scan>
inline bool keep_best(typename Scan::Candidate* c, int64_t& n, int64_t keep, typename Scan::acc_t& threshold) {
  using Candidate = typename Scan::Candidate;
  std::nth_element(c, c + keep - 1, c + n);
  const Candidate pivot = c[keep - 1];
  n = std::partition(c, c + n, [&](const Candidate& x) { return Scan::rank(x) <= Scan::rank(pivot); }) - c;
  threshold = Scan::z_of(pivot);
  return n + kWidth <= kCandidateCap;
}

template <typename acc_t>
struct RowSupport {
  KeptTokens<acc_t> cutoff;
  bool sums_known;  // s and w are set: the kept tokens are candidates
  acc_t s, w;       // the kept tokens' sum of exp(z - max z) and of exp(z - max z) (z - max z)
};

// The row's support under `rule`: min-p, then top-k, then top-p, each on the survivors of the one before.
template <typename Scan>
RowSupport<typename Scan::acc_t> find_support(Scan& scan, const SamplingNumbers& rule) {
  using acc_t = typename Scan::acc_t;
  using Candidate = typename Scan::Candidate;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  scan.find_max();
  if (scan.has_nan || scan.zmax == kInf) return {{std::numeric_limits<acc_t>::quiet_NaN(), 0}, false, 0, 0};
  KeptTokens<acc_t> survivors{-kInf, kEveryTie};  // every token
  // A row of -inf logits has no mass to truncate: every token stays (its log-probs are NaN anyway).
  if (scan.zmax == -kInf) return {survivors, false, 0, 0};
  int64_t count = scan.vocab;
  if (rule.log_min_p > -std::numeric_limits<double>::infinity()) {
    survivors = {min_p_threshold(scan.zmax, static_cast<acc_t>(rule.log_min_p)), kEveryTie};
    count = -1;
  }
  const bool top_k = rule.top_k > 0 && rule.top_k < scan.vocab, top_p = rule.top_p < 1;
  if (!top_k && !top_p) return {survivors, false, 0, 0};

  // Sweep 2: the best survivors (top-k's k of them, else kStreamKeep) into c, and the survivors' mass
  // for a top-p with no top-k before it. The stream starts at sweep 1's seed when that leaves enough:
  // top-k's k (kSeedCount tokens reach the seed, every one a survivor unless min-p's threshold lies above
  // it, and then the seed lets every survivor in), or top-p's usual set (checked below).
  Candidate c[kCandidateCap];
  int64_t n = 0;
  const int64_t keep = top_k ? rule.top_k : kStreamKeep;
  bool complete = true;  // c holds every survivor: the start took them all and none was dropped
  const auto make_room = [&](int64_t& size, acc_t& threshold) {
    complete = false;
    return keep_best<Scan>(c, size, keep, threshold);
  };
  acc_t survivors_mass = 0;
  bool streamed = false;
  if (keep <= kStreamKeep) {
    const acc_t start = !top_k || keep <= Scan::kSeedCount ? scan.seed : -kInf;
    complete = !(start > survivors.tau);
    streamed = top_k || !top_p ? scan.template stream<false>(survivors, start, c, n, make_room, &survivors_mass)
                               : scan.template stream<true>(survivors, start, c, n, make_room, &survivors_mass);
  }
  acc_t mass[kCandidateCap];
  int64_t kept = n;  // the candidates still surviving: a prefix of c once sorted
  if (streamed) {
    if (n > keep) {
      const int64_t all = n;
      acc_t threshold;
      keep_best<Scan>(c, n, keep, threshold);
      complete = complete && n == all;
    }
    std::sort(c, c + n);
    kept = n;
    for (int64_t i = 0; i < n; ++i) mass[i] = scan.mass_of(Scan::z_of(c[i]));
  }

  if (top_k) {
    if (streamed) {
      // c holds the k best survivors and their ties (or every survivor): the k-th is among them.
      if (!complete || n > rule.top_k) {
        const Walk<acc_t> walk = walk_candidates<false>(scan, c, mass, n, 0, acc_t(0), rule.top_k, acc_t(0),
                                                        rule.top_k_all_ties, survivors);
        survivors = walk.cutoff;
        kept = walk.kept;
      }
      count = kept;
    } else {
      const StageResult<acc_t> stage = Stage<false, Scan>(scan, survivors, count, static_cast<double>(rule.top_k),
                                                          rule.top_k_all_ties, c)
                                           .run();
      survivors = stage.cutoff;
      count = stage.count;
    }
  }

  if (top_p) {
    if (streamed) {
      // With top-k, c[0, kept) is every survivor; else the kStreamKeep best, which settle the boundary
      // when their mass reaches p times the survivors'.
      acc_t total = 0;
      for (int64_t i = 0; i < kept; ++i) total += mass[i];
      if (!top_k && !complete) total = survivors_mass;
      const Walk<acc_t> walk = walk_candidates<true>(scan, c, mass, kept, 0, acc_t(0), 0,
                                                     static_cast<acc_t>(rule.top_p) * total, false, survivors);
      streamed = top_k || complete || walk.reached_target;
      if (streamed) {
        survivors = walk.cutoff;
        kept = walk.kept;
      }
    }
    if (!streamed) survivors = Stage<true, Scan>(scan, survivors, count, rule.top_p, false, c).run().cutoff;
  }

  if (!streamed) return {survivors, false, 0, 0};
  // Every kept token is a candidate: their softmax sums need no sweep.
  acc_t s = 0, w = 0;
  for (int64_t i = 0; i < kept; ++i) {
    s += mass[i];
    if (mass[i] > 0) w += mass[i] * (Scan::z_of(c[i]) - scan.zmax);
  }
  return {survivors, true, s, w};
}

// ---- the forward rows: support, then logsumexp and entropy over the kept tokens ----

template <typename acc_t>
inline void write_cutoff(double* cutoff, int64_t r, const KeptTokens<acc_t>& kept, int64_t vocab) {
  cutoff[kCutoffFields * r] = static_cast<double>(kept.tau);
  cutoff[kCutoffFields * r + 1] = static_cast<double>(std::min(kept.tie_end, vocab));  // V: every tie
}

// One row: its cutoff, then lse, logp and entropy of the kept tokens (max z is kept: every stage keeps
// the first token, so it is the kept tokens' max too).
template <typename Scan, typename acc_t = typename Scan::acc_t>
inline void forward_support_row(Scan& scan, const ForwardJob& job, int64_t r) {
  acc_t* logps = static_cast<acc_t*>(job.logps);
  acc_t* lse = static_cast<acc_t*>(job.lse);
  acc_t* entropy = static_cast<acc_t*>(job.entropy_out);
  const RowSupport<acc_t> support = find_support(scan, *job.sampling);
  const KeptTokens<acc_t>& kept = support.cutoff;
  write_cutoff(job.cutoff, r, kept, scan.vocab);
  if (kept.tau != kept.tau) {  // a NaN logit
    lse[r] = logps[r] = std::numeric_limits<acc_t>::quiet_NaN();
    if (job.entropy) entropy[r] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  acc_t s = support.s, w = support.w;
  if (!support.sums_known && scan.zmax > -std::numeric_limits<acc_t>::infinity()) {
    if (job.entropy) {
      scan.template kept_sums<true>(kept, s, w);
    } else {
      scan.template kept_sums<false>(kept, s, w);
    }
  }
  const acc_t log_s = std::log(s);
  lse[r] = scan.zmax + log_s;
  const acc_t z_id = scan.z_at(job.ids[r]);
  logps[r] = kept.keeps(z_id, job.ids[r]) ? z_id - lse[r] : -std::numeric_limits<acc_t>::infinity();
  if (job.entropy) entropy[r] = log_s - w / s;
}

template <typename T>
void forward_support_rows(const ForwardJob& job, int64_t begin, int64_t end) {
  const T* base = static_cast<const T*>(job.logits);
  const RowLayout& lay = job.layout;
  for (int64_t r = begin; r < end; ++r) {
    FloatRowScan<T> scan{{}, base + lay.offset(r), r + 1 < end ? base + lay.offset(r + 1) : nullptr, lay.vocab,
                         static_cast<float>(job.scale)};
    forward_support_row(scan, job, r);
  }
}

#if defined(GRPO_FUSED_WITH_DOUBLE)
template <>
void forward_support_rows<double>(const ForwardJob& job, int64_t begin, int64_t end) {
  const double* base = static_cast<const double*>(job.logits);
  for (int64_t r = begin; r < end; ++r) {
    DoubleRowScan scan{base + job.layout.offset(r), nullptr, job.layout.vocab, job.scale};
    forward_support_row(scan, job, r);
  }
}
#endif  // GRPO_FUSED_WITH_DOUBLE

inline void forward_support(const ForwardJob& job, int64_t begin, int64_t end) {
  switch (job.elem) {
    case Elem::kFloat: return forward_support_rows<float>(job, begin, end);
#if defined(GRPO_FUSED_WITH_DOUBLE)
    case Elem::kDouble: return forward_support_rows<double>(job, begin, end);
#else
    case Elem::kDouble: return kernels_baseline()->forward(job, begin, end);
#endif
    case Elem::kBFloat16: return forward_support_rows<BF16>(job, begin, end);
    case Elem::kHalf: return forward_support_rows<F16>(job, begin, end);
  }
}
