// The vector helpers the CPU kernels share: loads and stores of every dtype as acc_t vectors,
// the fitted exponentials, streaming stores, lane reductions and target loads.
//
// Included by the kernel headers (ce_forward.h, ce_backward.h, bce.h) of one instruction-set
// build; like them it lives in the inline namespace CPU_CAPABILITY (see kernels_impl.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../fused_wloss_math.h"
#include "kernel_table.h"

namespace fused_wloss {
namespace cpu {
inline namespace CPU_CAPABILITY {


using at::vec::Vectorized;

constexpr double kLog2e = 1.44269504088896340736;
constexpr double kLn2 = 0.69314718055994530942;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads and stores of scalar_t as vectors of acc_t; the partial forms touch `n` elements and fill
// the other lanes with zeros.
template <typename T>
struct Io {
  using acc_t = float;
  using Vec = Vectorized<float>;
  static Vec load(const T* p) {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
  static Vec load(const T* p, int64_t n) {
    T buf[Vec::size()] = {};
    std::copy(p, p + n, buf);
    return load(buf);
  }
  static void store(T* p, Vec v, int64_t n = Vec::size()) {
    at::vec::convert_from_float<T>(v, v).store(p, static_cast<int>(n));
  }
};

template <typename F>
struct IoNative {
  using acc_t = F;
  using Vec = Vectorized<F>;
  static Vec load(const F* p) { return Vec::loadu(p); }
  static Vec load(const F* p, int64_t n) { return Vec::loadu(p, n); }
  static void store(F* p, Vec v, int64_t n = Vec::size()) {
    if (n == Vec::size()) {
      v.store(p);
    } else {
      v.store(p, static_cast<int>(n));
    }
  }
};
template <>
struct Io<float> : IoNative<float> {};
template <>
struct Io<double> : IoNative<double> {};

// 2^t for t <= 0 (up to rounding). kDegree picks the polynomial for the fraction of t: 6 gives
// about 1 ulp in float and serves every value computed one by one (probabilities, gradients, BCE
// terms); 5 gives 2.4 ulp at most (0.9 on average, with no bias) for one fused multiply-add less,
// and serves only the terms of the cross-entropy forward's sum of exponentials: its error reaches
// the loss, and the backward's p through the saved lse, as a log-sum-exp off by 1.5e-7 at most. The
// forward is bound by its exponential sweep, so that one instruction in ten is worth about 7% of it.
#if defined(CPU_CAPABILITY_AVX512)
// t = n + f with n = floor(t) and f in [0, 1) by one vreduceps, a polynomial for 2^f (least-squares
// fits of its relative error on [0, 1): 1.9e-9 before float rounding for degree 6, 8.2e-8 for
// degree 5), and the product with 2^n by one vscalefps, which also rounds results below 2^-126 to
// subnormals and gives 0 for t = -inf (vreduceps returns 0 there) and NaN for NaN. Eight vector
// instructions in all at degree 6.
template <int kDegree = 6>
inline Vectorized<float> exp2_nonpositive(const Vectorized<float>& t) {
  static_assert(kDegree == 5 || kDegree == 6);
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p;
  if constexpr (kDegree == 6) {
    p = _mm512_set1_ps(2.170225489e-04f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.243968843e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.678840637e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.548334122e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402298301e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470037e-01f));
  } else {
    p = _mm512_set1_ps(1.867130703e-03f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.017028957e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.579991411e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.401644499e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931513118e-01f));
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, t);
}
#else
// t = n + f with n = round(t) and |f| <= 1/2, a polynomial for 2^f (least-squares fits of relative
// error on Chebyshev nodes: 2e-9 before float rounding for degree 6, 9.2e-8 for degree 5) and 2^n
// built in the exponent bits. Inlined it is about a dozen vector instructions, several times
// cheaper than a call to Sleef's expf. t is clamped below at -127, where n = -127 makes the
// exponent field, and so the result, exactly 0: 2^-inf = 0 with no blend. NaN propagates
// (clamp_min is max(lo, t), which returns t when t is NaN). Arguments above 127 are not supported.
template <int kDegree = 6>
inline Vectorized<float> exp2_nonpositive(const Vectorized<float>& t) {
  static_assert(kDegree == 5 || kDegree == 6);
  using V = Vectorized<float>;
  using Vi = Vectorized<int32_t>;
  const V tc = at::vec::clamp_min(t, V(-127.0f));
  const V n = tc.round();
  const V f = tc - n;
  V p;
  if constexpr (kDegree == 6) {
    p = V(1.533757750e-04f);
    p = at::vec::fmadd(p, f, V(1.339985989e-03f));
    p = at::vec::fmadd(p, f, V(9.618519805e-03f));
    p = at::vec::fmadd(p, f, V(5.550329015e-02f));
    p = at::vec::fmadd(p, f, V(2.402264625e-01f));
    p = at::vec::fmadd(p, f, V(6.931471825e-01f));
  } else {
    p = V(1.326472708e-03f);
    p = at::vec::fmadd(p, f, V(9.671512862e-03f));
    p = at::vec::fmadd(p, f, V(5.550733746e-02f));
    p = at::vec::fmadd(p, f, V(2.402224208e-01f));
    p = at::vec::fmadd(p, f, V(6.931469776e-01f));
  }
  p = at::vec::fmadd(p, f, V(1.0f));
  const Vi scale = (at::vec::convert_to_int_of_same_size(n) + Vi(127)) << Vi(23);
  return p * at::vec::cast<float>(scale);
}
#endif

// exp(x - m) for x <= m, with `neg_m` = -m broadcast. x - m is formed first (exact when x is near
// m) and then scaled to base 2: a single fma of x * log2(e) - m * log2(e) would round the shift
// m * log2(e), as large as the logits, and carry that error into every term of the row.
inline Vectorized<float> exp_shifted(const Vectorized<float>& x, const Vectorized<float>& neg_m) {
  return exp2_nonpositive((x + neg_m) * Vectorized<float>(kLog2e));
}

// float64 (gradcheck's precision): Sleef's exp.
inline Vectorized<double> exp_shifted(const Vectorized<double>& x, const Vectorized<double>& neg_m) {
  return (x + neg_m).exp();
}

// exp(d) for a difference d = x - m <= 0 the caller has already formed, as a term of a sum of
// exponentials (the forward's): the degree-5 polynomial.
inline Vectorized<float> exp_of_difference(const Vectorized<float>& d) {
  return exp2_nonpositive<5>(d * Vectorized<float>(kLog2e));
}
inline Vectorized<double> exp_of_difference(const Vectorized<double>& d) { return d.exp(); }

// 1 / d for the denominators 1 + e and 2 + e (e in [0, 1]) of the BCE element: the hardware's
// reciprocal estimate and one Newton step, r (2 - d r), in place of a division. A 512-bit division
// costs as much as the rest of the element's arithmetic; the estimate's relative error (2^-14 on
// AVX-512, 1.5 * 2^-12 on AVX2) squares to below float's rounding, so the result is within 2 ulp.
inline Vectorized<float> reciprocal(const Vectorized<float>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
#else
  return Vectorized<float>(1.0f) / d;
#endif
}
inline Vectorized<double> reciprocal(const Vectorized<double>& d) { return Vectorized<double>(1.0) / d; }

// The broadcast second argument of exp_shifted for a maximum (or log-sum-exp) `m`.
inline Vectorized<float> shift_of(const Vectorized<float>& m) { return Vectorized<float>(0.0f) - m; }
inline Vectorized<double> shift_of(const Vectorized<double>& m) { return Vectorized<double>(0.0) - m; }

// Lane i of the result is row_vals[idx[i]]: the value of one of the kTileLanes rows of a tile, moved
// into the lanes of a flat vector of the small-C paths (idx[i] < kTileLanes).
inline Vectorized<float> spread_rows(const float* row_vals, const int32_t* idx) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_permutexvar_ps(_mm512_loadu_si512(idx), _mm512_loadu_ps(row_vals));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(row_vals), i);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(row_vals + 8), i);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))));
#else
  alignas(64) float buf[Vectorized<float>::size()];
  for (int64_t k = 0; k < Vectorized<float>::size(); ++k) buf[k] = row_vals[idx[k]];
  return Vectorized<float>::loadu(buf);
#endif
}

// Non-temporal stores for a large gradient that nothing reads back soon: they skip reading each
// destination line before writing it (a third of the backward's memory traffic).
#if defined(CPU_CAPABILITY_AVX512)
inline void stream_store(float* p, const Vectorized<float>& v) { _mm512_stream_ps(p, v); }
inline void stream_fence() { _mm_sfence(); }
template <typename T>
constexpr bool kStreamable = std::is_same_v<T, float>;
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_store(float* p, const Vectorized<float>& v) { _mm256_stream_ps(p, v); }
inline void stream_fence() { _mm_sfence(); }
template <typename T>
constexpr bool kStreamable = std::is_same_v<T, float>;
#else
inline void stream_store(float* p, const Vectorized<float>& v) { v.store(p); }
inline void stream_fence() {}
template <typename T>
constexpr bool kStreamable = false;
#endif

// max(acc, v) without NaN bookkeeping: a NaN in a row is caught where it matters, by the sum of
// exponentials (x - max is NaN there, and exp_shifted propagates it).
template <typename V>
inline V running_max(const V& acc, const V& v) {
  return at::vec::clamp_min(v, acc);
}

// float(1 + d (1 + d / 2)) for each lane, with the arithmetic in float64 and one rounding, as the
// backward's scalar shift_for forms exp(d) for the small |d| < 1e-3 of the lse's low part (a
// float evaluation rounds differently for about one row in forty).
inline Vectorized<float> taylor_exp_f64(const Vectorized<float>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5);
  auto f = [&](__m256 x) {
    const __m512d v = _mm512_cvtps_pd(x);
    return _mm512_cvtpd_ps(_mm512_add_pd(one, _mm512_mul_pd(v, _mm512_add_pd(one, _mm512_mul_pd(half, v)))));
  };
  const __m512 v = d;
  return _mm512_insertf32x8(_mm512_castps256_ps512(f(_mm512_castps512_ps256(v))), f(_mm512_extractf32x8_ps(v, 1)), 1);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256d one = _mm256_set1_pd(1.0), half = _mm256_set1_pd(0.5);
  auto f = [&](__m128 x) {
    const __m256d v = _mm256_cvtps_pd(x);
    return _mm256_cvtpd_ps(_mm256_add_pd(one, _mm256_mul_pd(v, _mm256_add_pd(one, _mm256_mul_pd(half, v)))));
  };
  const __m256 v = d;
  return _mm256_set_m128(f(_mm256_extractf128_ps(v, 1)), f(_mm256_castps256_ps128(v)));
#else
  alignas(64) float buf[Vectorized<float>::size()];
  d.store(buf);
  for (float& x : buf) {
    const double v = x;
    x = static_cast<float>(1.0 + v * (1.0 + 0.5 * v));
  }
  return Vectorized<float>::loadu(buf);
#endif
}

// Whether any lane of a comparison's result (all bits set or clear) is set.
template <typename V>
inline bool any_lane(const V& mask) {
  return mask.zero_mask() != (1 << V::size()) - 1;
}

// Element selection on the sign of x, for the hot BCE loops. at::vec's AVX-512 comparisons return a
// vector (a mask widened to all-ones lanes) that blendv then compares back into a mask: two extra
// instructions a blend, and three for a lane test. These use the comparison's mask as it comes;
// other instruction sets go through blendv. The results are the same bits either way.

// Lanes of `a` where x >= 0, of `b` elsewhere (x NaN included).
template <typename V>
C10_ALWAYS_INLINE V select_nonneg(const V& x, const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
  } else if constexpr (std::is_same_v<V, Vectorized<double>>) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(x, _mm512_setzero_pd(), _CMP_GE_OQ), b, a);
  }
#endif
  return V::blendv(b, a, x >= V(0));
}

// Whether any lane of x is -inf.
template <typename V>
C10_ALWAYS_INLINE bool any_neg_inf(const V& x) {
  using T = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ) != 0;
  } else if constexpr (std::is_same_v<V, Vectorized<double>>) {
    return _mm512_cmp_pd_mask(x, _mm512_set1_pd(-std::numeric_limits<double>::infinity()), _CMP_EQ_OQ) != 0;
  }
#endif
  return any_lane(x == V(-std::numeric_limits<T>::infinity()));
}

// The n < V elements from p on, as acc_t, with `fill` in the other lanes: one masked load for
// float32 on AVX-512 (no fault past the end: masked lanes are not read).
template <typename T, typename V>
C10_ALWAYS_INLINE V load_partial(const T* p, int64_t n, const V& fill) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_loadu_ps(fill, static_cast<__mmask16>((1u << n) - 1u), p);
  }
#endif
  return V::set(fill, Io<T>::load(p, n), n);
}

// K-dim inputs are read as C streams, one per class plane, a plane apart: more streams than the
// hardware prefetchers follow at segmentation shapes (C = 19 took the forward to half the speed
// of the same logits in rows). Each access also requests the line kPlanePrefetchBytes further on
// in its plane, into L2: with a power-of-two plane the C lines of one block share an L1 set, and
// prefetches into L1 evicted one another before use. 512 to 4096 bytes measured alike.
constexpr int64_t kPlanePrefetchBytes = 1024;
template <typename T>
inline void prefetch_plane(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPlanePrefetchBytes, _MM_HINT_T1);
}

template <typename V>
inline typename V::value_type reduce_sum(const V& v) {
  typename V::value_type buf[V::size()];
  v.store(buf);
  typename V::value_type s = 0;
  for (int i = 0; i < V::size(); ++i) s += buf[i];
  return s;
}

template <typename V>
inline typename V::value_type reduce_max(const V& v) {
  typename V::value_type buf[V::size()];
  v.store(buf);
  typename V::value_type m = buf[0];
  for (int i = 1; i < V::size(); ++i) m = buf[i] > m ? buf[i] : m;  // a NaN: see running_max
  return m;
}

#if defined(CPU_CAPABILITY_AVX512)
// Tree reductions in registers for the rows path (once per row). The maximum may drop a NaN lane:
// the row's sum of exponentials still turns NaN there (x - max is NaN), as running_max relies on.
template <>
inline float reduce_sum(const Vectorized<float>& v) {
  return _mm512_reduce_add_ps(v);
}
template <>
inline float reduce_max(const Vectorized<float>& v) {
  return _mm512_reduce_max_ps(v);
}
#endif

// How far ahead of its exponential sweep the rows path of the forward (and of the backward)
// prefetches the logits (into L1, so that the max sweeps of the rows that follow do not wait on
// DRAM). At 8192 x 1000 float32 (AMD EPYC, AVX-512, 1 and 2 threads) 12 to 20 KB measured alike;
// 8 KB was 9% slower, 4 KB 35% and 32 KB 2%. A fixed distance in bytes, not in rows: for long
// rows it stays inside L1's reach.
constexpr int64_t kPrefetchBytes = 16384;

inline int64_t load_target(const void* target, bool is_int32, int64_t row) {
  return is_int32 ? static_cast<const int32_t*>(target)[row]
                  : static_cast<const int64_t*>(target)[row];
}
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_wloss
