// Vectorised CPU kernels of fused_wloss, one chunk of rows per call.
//
// This file is compiled once per instruction set by kernels_{default,avx2,avx512}.cpp, each with
// its own CPU_CAPABILITY and -m flags, into its own Python module; everything here lives in the
// inline namespace CPU_CAPABILITY (as ATen's own kernels do) so the three builds never share a
// symbol. The operators in losses_cpu.cpp cut the work into chunks and call these through a
// KernelTable; the per-element formulas come from fused_wloss_math.h.
//
// Cross-entropy, three layouts (see CeLayout):
// - rows (P == 1, C >= 32): vectors along the classes; two sweeps over each row (max, then sum of
//   exponentials), the second from cache, so memory sees one read. The forward finishes its rows
//   16 at a time (one vector log, one epilogue loop); the backward goes row by row.
// - tiled (P == 1, C < 32): a vector along C would be mostly empty, so 16 rows are packed into a
//   [C][16] tile and processed as 16 lanes, one row per lane.
// - columns (P > 1, K-dim inputs): classes are strided by P and pixels contiguous, so vectors run
//   along the pixels, one pixel per lane, with no permute copy of the logits: the backward in place,
//   the forward through a [C][V] block (V lanes of acc_t) copied from the class planes, one block
//   ahead of its sweep. Every class plane is also prefetched, a kilobyte ahead.
// The per-row epilogue (target gather, weights, loss) is scalar, in float64; the true-class
// gradient is in acc_t (float32 for reduced precision inputs).
#pragma once

#include <Python.h>

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

inline int64_t load_target(const void* target, bool is_int32, int64_t row) {
  return is_int32 ? static_cast<const int32_t*>(target)[row]
                  : static_cast<const int64_t*>(target)[row];
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy forward

// How far ahead of its exponential sweep the rows path of the forward (and of the backward)
// prefetches the logits (into L1, so that the max sweeps of the rows that follow do not wait on
// DRAM). At 8192 x 1000 float32 (AMD EPYC, AVX-512, 1 and 2 threads) 12 to 20 KB measured alike;
// 8 KB was 9% slower, 4 KB 35% and 32 KB 2%. A fixed distance in bytes, not in rows: for long
// rows it stays inside L1's reach.
constexpr int64_t kPrefetchBytes = 16384;

template <typename scalar_t>
struct CeForward {
  using acc_t = acc_type_t<scalar_t>;
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;

  const CeForwardArgs& a;
  const scalar_t* x;
  const acc_t* cw;
  const acc_t* sw;
  acc_t* lse_hi_out;
  acc_t* lse_lo_out;
  scalar_t* loss_out;
  double eps, num_classes, sum_w;
  bool smooth;

  explicit CeForward(const CeForwardArgs& args)
      : a(args),
        x(static_cast<const scalar_t*>(args.in.input)),
        cw(static_cast<const acc_t*>(args.in.class_w)),
        sw(static_cast<const acc_t*>(args.in.sample_w)),
        lse_hi_out(static_cast<acc_t*>(args.lse_hi_out)),
        lse_lo_out(static_cast<acc_t*>(args.lse_lo_out)),
        loss_out(static_cast<scalar_t*>(args.loss_out)),
        eps(args.in.label_smoothing),
        num_classes(static_cast<double>(args.in.layout.C)),
        sum_w(args.in.sum_w),
        smooth(args.in.label_smoothing > 0.0) {}

  // The per-row epilogue, from the row maximum m, the log of the sum of exp(x - m) and
  // sum_wd = sum_c W_c (x_c - m): gather the target logit (class c of the row at xrow[c * stride]),
  // apply the weights, add to the partials. In float64, with every lse - x formed as
  // (m - x) + log s. `part` is the caller's local copy, so the sums stay in registers.
  template <typename in_t>
  C10_ALWAYS_INLINE void finish_row(int64_t row, const in_t* xrow, int64_t stride, acc_t m, acc_t log_s,
                  acc_t sum_wd, CePartial& part) const {
    const int64_t C = a.in.layout.C;
    const double md = static_cast<double>(m), ls = static_cast<double>(log_s);
    const LseParts<acc_t> lse = split_lse<acc_t>(md, ls);
    lse_hi_out[row] = lse.hi;
    lse_lo_out[row] = lse.lo;
    const int64_t t = load_target(a.in.target, a.in.target_int32, row);
    double loss = 0;
    if (t != a.in.ignore_index) {
      if (t < 0 || t >= C) {
        if (part.bad_row < 0) {
          part.bad_row = row;
          part.bad_value = t;
        }
      } else {
        const double x_t = static_cast<double>(xrow[t * stride]);
        const double w_t = cw ? static_cast<double>(cw[t]) : 1.0;
        const double s = sw ? static_cast<double>(sw[row]) : 1.0;
        const double nll = (md - x_t) + ls;
        const double smooth_sum = smooth ? sum_w * ls - static_cast<double>(sum_wd) : 0.0;
        // focal loss (gamma > 0; never with label smoothing, the Python layer refuses that)
        const double focal_nll = focal_ce_loss(nll, a.in.gamma);
        loss = s * ce_index_loss(focal_nll, smooth_sum, w_t, eps, num_classes);
        part.loss_sum += loss;
        part.weight_sum += s * w_t;
        part.valid += 1;
      }
    }
    if (loss_out) loss_out[row] = static_cast<scalar_t>(loss);
  }

  // finish_row for the `lanes` consecutive rows from row0 of a block, a tile or a group of rows,
  // row j's class c at xb[j * lane_stride + c * stride]. Plain cross-entropy (no label smoothing,
  // no focal term) takes a loop with every invariant in a register and none of finish_row's
  // option branches: at C = 19 the per-row epilogue had cost as much as the block's vector
  // sweeps. Same formulas, in float64; the block's sums are added to the partials at its end, so
  // the rounding (not the determinism) differs from finish_row's row-by-row sums.
  template <typename in_t>
  void finish_block(int64_t row0, const in_t* xb, int64_t stride, int64_t lane_stride, int64_t lanes,
                    const acc_t* mx, const acc_t* log_s, const acc_t* sum_wd, CePartial& part) const {
    if (smooth || a.in.gamma != 0.0) {
      for (int64_t j = 0; j < lanes; ++j) {
        finish_row(row0 + j, xb + j * lane_stride, stride, mx[j], log_s[j], sum_wd[j], part);
      }
      return;
    }
    static_assert(Vec::size() <= kTileLanes, "a block has at most kTileLanes lanes");
    int64_t tt[kTileLanes];
    if (a.in.target_int32) {
      const int32_t* tp = static_cast<const int32_t*>(a.in.target) + row0;
      for (int64_t j = 0; j < lanes; ++j) tt[j] = tp[j];
    } else {
      const int64_t* tp = static_cast<const int64_t*>(a.in.target) + row0;
      for (int64_t j = 0; j < lanes; ++j) tt[j] = tp[j];
    }
    const int64_t C = a.in.layout.C, ignore = a.in.ignore_index;
    const acc_t* const w = cw;
    const acc_t* const s = sw ? sw + row0 : nullptr;
    acc_t* const lse_hi = lse_hi_out + row0;
    acc_t* const lse_lo = lse_lo_out + row0;
    scalar_t* const out = loss_out ? loss_out + row0 : nullptr;
    double loss_sum = 0, weight_sum = 0;
    int64_t valid = 0;
    for (int64_t j = 0; j < lanes; ++j) {
      const double md = static_cast<double>(mx[j]), ls = static_cast<double>(log_s[j]);
      const LseParts<acc_t> lse = split_lse<acc_t>(md, ls);
      lse_hi[j] = lse.hi;
      lse_lo[j] = lse.lo;
      const int64_t t = tt[j];
      double loss = 0;
      if (t != ignore) {
        if (t < 0 || t >= C) {
          if (part.bad_row < 0) {
            part.bad_row = row0 + j;
            part.bad_value = t;
          }
        } else {
          const double w_t = w ? static_cast<double>(w[t]) : 1.0;
          const double s_j = s ? static_cast<double>(s[j]) : 1.0;
          const double nll = (md - static_cast<double>(xb[j * lane_stride + t * stride])) + ls;
          loss = s_j * (w_t * nll);
          loss_sum += loss;
          weight_sum += s_j * w_t;
          valid += 1;
        }
      }
      if (out) out[j] = static_cast<scalar_t>(loss);
    }
    part.loss_sum += loss_sum;
    part.weight_sum += weight_sum;
    part.valid += valid;
  }

#if defined(CPU_CAPABILITY_AVX512)
  // finish_block's plain cross-entropy on AVX-512 for the acc_t float blocks and tiles
  // (finish_acc_block), all 16 lanes in registers: the targets checked as vectors, x_t and W_t
  // gathered, the float64 arithmetic (split_lse, the element losses, their sums) on two halves of
  // 8 lanes. Lane by lane in float64 this epilogue had cost a third of the K-dim forward at
  // C = 19; staging the lanes through memory for vector loads was slower than that, and so were
  // masked loads and stores of whole vectors, which full blocks avoid. Same formulas as the scalar
  // loop; the sums are added lane-wise, then across lanes in a fixed order. The caller checks that
  // the gather indices fit in int32.
  void finish_block_avx512(int64_t row0, const float* xb, int64_t stride, int64_t lanes, const float* mx,
                           const float* log_s, CePartial& part) const {
    const int64_t C = a.in.layout.C, ignore = a.in.ignore_index;
    const bool full = lanes >= 16;
    const __mmask16 live = static_cast<__mmask16>(full ? 0xFFFFu : (1u << lanes) - 1u);
    // the targets as int32 lanes, and which are not ignored and which in [0, C) (checked in int64
    // for int64 targets, before they are narrowed)
    __mmask16 not_ignored, in_range;
    __m512i t32;
    if (a.in.target_int32) {
      const int32_t* tp = static_cast<const int32_t*>(a.in.target) + row0;
      t32 = full ? _mm512_loadu_si512(tp) : _mm512_maskz_loadu_epi32(live, tp);
      const bool ignore_fits = ignore >= std::numeric_limits<int32_t>::min() &&
                               ignore <= std::numeric_limits<int32_t>::max();
      const __m512i ig = _mm512_set1_epi32(static_cast<int32_t>(ignore));
      not_ignored = ignore_fits ? _mm512_mask_cmpneq_epi32_mask(live, t32, ig) : live;
      in_range = _mm512_cmpge_epi32_mask(t32, _mm512_setzero_si512()) &
                 _mm512_cmplt_epi32_mask(t32, _mm512_set1_epi32(static_cast<int32_t>(C)));
    } else {
      const int64_t* tp = static_cast<const int64_t*>(a.in.target) + row0;
      const __mmask8 live_lo = static_cast<__mmask8>(live), live_hi = static_cast<__mmask8>(live >> 8);
      const __m512i lo = full ? _mm512_loadu_si512(tp) : _mm512_maskz_loadu_epi64(live_lo, tp);
      const __m512i hi = full ? _mm512_loadu_si512(tp + 8) : _mm512_maskz_loadu_epi64(live_hi, tp + 8);
      const __m512i ig = _mm512_set1_epi64(ignore), zero = _mm512_setzero_si512(), c = _mm512_set1_epi64(C);
      not_ignored = static_cast<__mmask16>(_mm512_mask_cmpneq_epi64_mask(live_lo, lo, ig) |
                                           (_mm512_mask_cmpneq_epi64_mask(live_hi, hi, ig) << 8));
      in_range = static_cast<__mmask16>(
          (_mm512_cmpge_epi64_mask(lo, zero) & _mm512_cmplt_epi64_mask(lo, c)) |
          ((_mm512_cmpge_epi64_mask(hi, zero) & _mm512_cmplt_epi64_mask(hi, c)) << 8));
      t32 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
    }
    const __mmask16 bad = static_cast<__mmask16>(not_ignored & ~in_range);
    if (bad && part.bad_row < 0) {
      const int j = __builtin_ctz(bad);
      part.bad_row = row0 + j;
      part.bad_value = load_target(a.in.target, a.in.target_int32, row0 + j);
    }
    const __mmask16 counted = static_cast<__mmask16>(not_ignored & in_range);
    // lane j's true-class logit at xb[j + t * stride]
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i idx =
        _mm512_add_epi32(lane, _mm512_mullo_epi32(t32, _mm512_set1_epi32(static_cast<int32_t>(stride))));
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    const __m512 vx = _mm512_mask_i32gather_ps(zero, counted, idx, xb, 4);
    const __m512 vw = cw ? _mm512_mask_i32gather_ps(zero, counted, t32, cw, 4) : one;
    const __m512 vs = !sw ? one : full ? _mm512_loadu_ps(sw + row0) : _mm512_maskz_loadu_ps(live, sw + row0);
    const __m512 vm = _mm512_loadu_ps(mx), vl = _mm512_loadu_ps(log_s);
    __m256 hi_f[2], lo_f[2], loss_f[2];
    __m512d loss_sum = _mm512_setzero_pd(), weight_sum = _mm512_setzero_pd();
    for (int h = 0; h < 2; ++h) {
      auto half = [h](__m512 v) {
        return _mm512_cvtps_pd(h == 0 ? _mm512_castps512_ps256(v) : _mm512_extractf32x8_ps(v, 1));
      };
      const __m512d m = half(vm), l = half(vl), x = half(vx), w = half(vw), sj = half(vs);
      hi_f[h] = _mm512_cvtpd_ps(_mm512_add_pd(m, l));
      lo_f[h] = _mm512_cvtpd_ps(_mm512_add_pd(_mm512_sub_pd(m, _mm512_cvtps_pd(hi_f[h])), l));
      const __mmask8 ok = static_cast<__mmask8>(counted >> (8 * h));
      const __m512d nll = _mm512_add_pd(_mm512_sub_pd(m, x), l);
      const __m512d loss = _mm512_maskz_mul_pd(ok, sj, _mm512_mul_pd(w, nll));
      loss_sum = _mm512_add_pd(loss_sum, loss);
      weight_sum = _mm512_add_pd(weight_sum, _mm512_maskz_mul_pd(ok, sj, w));
      loss_f[h] = _mm512_cvtpd_ps(loss);
    }
    auto join = [](__m256 lo, __m256 hi) { return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1); };
    auto store = [&](float* p, __m512 v) {
      if (full) {
        _mm512_storeu_ps(p, v);
      } else {
        _mm512_mask_storeu_ps(p, live, v);
      }
    };
    store(lse_hi_out + row0, join(hi_f[0], hi_f[1]));
    store(lse_lo_out + row0, join(lo_f[0], lo_f[1]));
    if (loss_out) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        store(loss_out + row0, join(loss_f[0], loss_f[1]));
      } else {
        alignas(64) float buf[kTileLanes];
        _mm512_store_ps(buf, join(loss_f[0], loss_f[1]));
        for (int64_t j = 0; j < lanes; ++j) loss_out[row0 + j] = static_cast<scalar_t>(buf[j]);
      }
    }
    part.loss_sum += _mm512_reduce_add_pd(loss_sum);
    part.weight_sum += _mm512_reduce_add_pd(weight_sum);
    part.valid += __builtin_popcount(counted);
  }
#endif

  // finish_block for V lanes of a K-dim block or a tile (acc_t, lane stride 1), through the
  // AVX-512 epilogue where it applies (plain cross-entropy, int32 gather indices). The rows path
  // keeps finish_block: its statistics are stored lane by lane, and vector loads of them stalled.
  void finish_acc_block(int64_t row0, const acc_t* xb, int64_t stride, int64_t lanes, const acc_t* mx,
                        const acc_t* log_s, const acc_t* sum_wd, CePartial& part) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (!smooth && a.in.gamma == 0.0 &&
          kTileLanes * (a.in.layout.C + 1) * stride < std::numeric_limits<int32_t>::max()) {
        finish_block_avx512(row0, xb, stride, lanes, mx, log_s, part);
        return;
      }
    }
#endif
    finish_block(row0, xb, stride, 1, lanes, mx, log_s, sum_wd, part);
  }

  // rows layout: vectors along one row of C contiguous classes; a max sweep, then a sweep of
  // exp(x - m) (and of W (x - m) for label smoothing) from cache. Four independent accumulators
  // per sweep, so the max and add latency chains do not serialise the loop. The rows of a chunk go
  // in groups of kTileLanes: the sweeps leave each row's max, sum of exponentials and sum_wd in
  // arrays, and the group's logs (one vector log) and epilogue (finish_block) follow. Row by row,
  // a libm logf, the epilogue's branches and the sweeps' setup had cost more than the sweeps
  // themselves at C = 40, and a sixth of the forward at C = 1000.
  void rows(int64_t r0, int64_t r1, CePartial& part) const {
    if (smooth) {
      rows_in_groups<true>(r0, r1, part);
    } else {
      rows_in_groups<false>(r0, r1, part);
    }
  }

  template <bool kSmooth>
  void rows_in_groups(int64_t r0, int64_t r1, CePartial& part) const {
    constexpr int64_t V = Vec::size();
    const int64_t C = a.in.layout.C;
    // The line kPrefetchBytes past each vector is requested during its exponential sweep (the rows
    // are consecutive in memory); rows closer than that to the end of the input prefetch nothing.
    const int64_t row_bytes = C * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t prefetch_limit = a.in.layout.N * row_bytes - kPrefetchBytes;
    alignas(64) acc_t mx[kTileLanes], sums[kTileLanes], ls[kTileLanes], swd[kTileLanes];
    std::fill(sums, sums + kTileLanes, acc_t(1));  // lanes past a short last group: log 1
    for (int64_t r = r0; r < r1; r += kTileLanes) {
      const int64_t lanes = std::min<int64_t>(kTileLanes, r1 - r);
      for (int64_t j = 0; j < lanes; ++j) {
        const scalar_t* xr = x + (r + j) * C;
        row_sweeps<kSmooth>(xr, (r + j + 1) * row_bytes <= prefetch_limit, mx[j], sums[j], swd[j]);
      }
      for (int64_t j = 0; j < kTileLanes; j += V) Vec::loadu(sums + j).log().store(ls + j);
      finish_block(r, x + r * C, 1, C, lanes, mx, ls, swd, part);
    }
  }

  // One row's maximum m, sum of exp(x - m) and sum_c W_c (x_c - m) (label smoothing only). A row's
  // last C % V classes are one partial vector (the lanes past the row masked), not scalar code:
  // with C = 1000 and V = 16, scalar tails with a libm exp each cost a tenth of the forward.
  template <bool kSmooth>
  C10_ALWAYS_INLINE void row_sweeps(const scalar_t* xr, bool prefetch, acc_t& m_out, acc_t& sum_out,
                                    acc_t& sum_wd_out) const {
    const int64_t C = a.in.layout.C;
    constexpr int64_t V = Vec::size();
    const int64_t full = C - C % V, tail = C - full;
    const Vec neg_inf(-std::numeric_limits<acc_t>::infinity()), zero(acc_t(0));
    Vec m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    int64_t c = 0;
    for (; c + 4 * V <= C; c += 4 * V) {
      m0 = running_max(m0, IO::load(xr + c));
      m1 = running_max(m1, IO::load(xr + c + V));
      m2 = running_max(m2, IO::load(xr + c + 2 * V));
      m3 = running_max(m3, IO::load(xr + c + 3 * V));
    }
    for (; c < full; c += V) m0 = running_max(m0, IO::load(xr + c));
    // the tail with -inf in the lanes past the row: neutral for the max, and exp(-inf - m) = 0
    // in the sweep below (a row whose max is -inf or +inf turns NaN in its own lanes anyway)
    const Vec xt = tail > 0 ? load_partial(xr + full, tail, neg_inf) : neg_inf;
    m1 = running_max(m1, xt);
    const acc_t m = reduce_max(running_max(running_max(m0, m1), running_max(m2, m3)));

    const Vec sh = shift_of(Vec(m));
    Vec s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    Vec w0 = zero, w1 = zero;
    const char* next = reinterpret_cast<const char*>(xr) + kPrefetchBytes;
    auto sweep = [&](int64_t at, Vec& s_acc, Vec& w_acc) {
      if (prefetch) _mm_prefetch(next + at * static_cast<int64_t>(sizeof(scalar_t)), _MM_HINT_T0);
      const Vec d = IO::load(xr + at) + sh;
      s_acc = s_acc + exp_of_difference(d);
      if constexpr (kSmooth) w_acc = w_acc + (cw ? d * Vec::loadu(cw + at) : d);
    };
    for (c = 0; c + 4 * V <= C; c += 4 * V) {
      sweep(c, s0, w0);
      sweep(c + V, s1, w1);
      sweep(c + 2 * V, s2, w0);
      sweep(c + 3 * V, s3, w1);
    }
    for (; c < full; c += V) sweep(c, s0, w0);
    if (tail > 0) {
      s1 = s1 + exp_of_difference(xt + sh);
      if constexpr (kSmooth) {
        const Vec d = Vec::set(zero, xt + sh, tail);
        w1 = w1 + (cw ? d * Vec::loadu(cw + full, tail) : d);
      }
    }
    m_out = m;
    sum_out = reduce_sum((s0 + s1) + (s2 + s3));
    sum_wd_out = kSmooth ? reduce_sum(w0 + w1) : acc_t(0);
  }

  // Blocks: V rows (or pixels) one per lane, in an acc_t block whose class c is the vector at
  // block + c * stride (a packed tile of the tiled path, a copied K-dim block of the columns path).

  // The lanes' maximum over the classes; two accumulators, so the max latency chain is half as long.
  Vec block_max(const acc_t* block, int64_t stride) const {
    const int64_t C = a.in.layout.C;
    Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      m0 = running_max(m0, Vec::loadu(block + c * stride));
      m1 = running_max(m1, Vec::loadu(block + (c + 1) * stride));
    }
    if (c < C) m0 = running_max(m0, Vec::loadu(block + c * stride));
    return running_max(m0, m1);
  }

  // From the lanes' maximum `vmax`: writes each lane's max, log of the sum of exponentials and
  // sum_c W_c (x_c - max).
  void block_sums(const acc_t* block, int64_t stride, const Vec& vmax, acc_t* mx, acc_t* log_s,
                  acc_t* sum_wd) const {
    if (smooth) {
      block_sweep<true>(block, stride, vmax, mx, log_s, sum_wd);
    } else {
      block_sweep<false>(block, stride, vmax, mx, log_s, sum_wd);
    }
  }

  template <bool kSmooth>
  void block_sweep(const acc_t* block, int64_t stride, const Vec& vmax, acc_t* mx, acc_t* log_s,
                   acc_t* sum_wd) const {
    const int64_t C = a.in.layout.C;
    const Vec sh = shift_of(vmax), zero(acc_t(0));
    Vec s0 = zero, s1 = zero, wd = zero;
    auto term = [&](int64_t c, Vec& s_acc) {
      const Vec d = Vec::loadu(block + c * stride) + sh;
      s_acc = s_acc + exp_of_difference(d);
      if constexpr (kSmooth) wd = wd + d * Vec(cw ? cw[c] : acc_t(1));
    };
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      term(c, s0);
      term(c + 1, s1);
    }
    if (c < C) term(c, s0);
    vmax.store(mx);
    (s0 + s1).log().store(log_s);
    wd.store(sum_wd);
  }

  // K-dim: the n <= V pixels from src on (class c at src + c * stride) copied into a [C][V] block
  // (lanes past n are 0); returns their maximum over the classes.
  Vec pack_columns(const scalar_t* src, int64_t stride, int64_t n, acc_t* block) const {
    constexpr int64_t V = Vec::size();
    const int64_t C = a.in.layout.C;
    Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
    auto copy = [&](int64_t c, Vec& m_acc) {
      prefetch_plane(src + c * stride);
      const Vec v = n == V ? IO::load(src + c * stride) : IO::load(src + c * stride, n);
      v.store(block + c * V);
      m_acc = running_max(m_acc, v);
    };
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      copy(c, m0);
      copy(c + 1, m1);
    }
    if (c < C) copy(c, m0);
    return running_max(m0, m1);
  }

  void chunk(int64_t chunk_index, CePartial* out) const {
    CePartial part = *out;
    const CeLayout& l = a.in.layout;
    constexpr int64_t V = Vec::size();
    alignas(64) acc_t mx[kTileLanes], ls[kTileLanes], swd[kTileLanes];
    if (l.P > 1) {
      const int64_t n = chunk_index / l.chunks_per_n;
      const int64_t p0 = (chunk_index % l.chunks_per_n) * l.rows_per_chunk;
      const int64_t p1 = std::min(l.P, p0 + l.rows_per_chunk);
      const scalar_t* xn = x + n * l.C * l.P;
      // A block of V pixels is copied, as acc_t, into a [C][V] block in consecutive memory (its C
      // lines in memory lie a plane apart: with a power-of-two P they share an L1 and an L2 set,
      // and the second sweep and the target gather read them again from further out). The loop
      // is software-pipelined: the copy and maximum of block k + 1 come before the exponential
      // sweep of block k, which does not depend on them, so the max latency chain of one block
      // runs under the other's sweep; one block at a time, the sweep waited for it.
      const int64_t C = l.C;
      // (A 64-byte aligned, uninitialised buffer measured 3% slower than this one.)
      std::vector<acc_t> blocks(static_cast<size_t>(2 * C * V));
      acc_t* cur = blocks.data();
      acc_t* next = cur + C * V;
      Vec vmax = pack_columns(xn + p0, l.P, std::min<int64_t>(V, p1 - p0), cur);
      for (int64_t p = p0; p < p1; p += V) {
        const int64_t lanes = std::min<int64_t>(V, p1 - p);
        Vec next_max = vmax;
        if (p + V < p1) next_max = pack_columns(xn + p + V, l.P, std::min<int64_t>(V, p1 - p - V), next);
        block_sums(cur, V, vmax, mx, ls, swd);
        finish_acc_block(n * l.P + p, cur, V, lanes, mx, ls, swd, part);
        std::swap(cur, next);
        vmax = next_max;
      }
      *out = part;
      return;
    }
    const int64_t r0 = chunk_index * l.rows_per_chunk;
    const int64_t r1 = std::min(l.N, r0 + l.rows_per_chunk);
    if (!l.tiled) {
      rows(r0, r1, part);
      *out = part;
      return;
    }
    for (int64_t r = r0; r < r1; r += kTileLanes) {
      tile(r, std::min<int64_t>(kTileLanes, r1 - r), part);
    }
    *out = part;
  }

  // tiled: `rows` rows from r on, packed into a [C][kTileLanes] tile, one row per lane.
  void tile(int64_t r, int64_t rows, CePartial& part) const {
    const int64_t C = a.in.layout.C;
    constexpr int64_t V = Vec::size();
    alignas(64) acc_t mx[kTileLanes], ls[kTileLanes], swd[kTileLanes];
    alignas(64) acc_t tile[2 * kTileLanes * kTileLanes];  // C < 2 * kTileLanes
    pack_tile(x + r * C, rows, C, tile);
    for (int64_t j = 0; j < kTileLanes; j += V) {
      block_sums(tile + j, kTileLanes, block_max(tile + j, kTileLanes), mx + j, ls + j, swd + j);
    }
    finish_acc_block(r, tile, kTileLanes, rows, mx, ls, swd, part);
  }

  static void pack_tile(const scalar_t* src, int64_t rows, int64_t C, acc_t* tile) {
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t c = 0; c < C; ++c) tile[c * kTileLanes + j] = static_cast<acc_t>(src[j * C + c]);
    for (int64_t j = rows; j < kTileLanes; ++j)
      for (int64_t c = 0; c < C; ++c) tile[c * kTileLanes + j] = acc_t(0);
  }
};

template <typename scalar_t>
void ce_forward_chunk(const CeForwardArgs& args, int64_t chunk, CePartial* out) {
  CeForward<scalar_t>(args).chunk(chunk, out);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy backward: d loss / d x_c = a p_c - b [c == t] - e W_c (see ce_index_grad_coeffs)

// Below this many classes the float32 backward goes 16 rows at a time as flat vectors (flat_tile)
// when it does not stream its gradient; from C = 32 on that replaces the rows path, whose per-row
// setup and partial last vector cost more there. Backward only, 65536 rows, 2 threads (AMD EPYC,
// AVX-512): flat was 36% faster at C = 33, 23% at 40 and 44; the rows path 7% faster at 48 (no
// partial vector) and 56, 15% at 63.
constexpr int64_t kFlatMaxC = 48;

template <typename scalar_t>
struct CeBackward {
  using acc_t = acc_type_t<scalar_t>;
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;

  const CeBackwardArgs& a;
  const scalar_t* x;
  const acc_t* cw;
  const acc_t* sw;
  const acc_t* lse_hi;
  const acc_t* lse_lo;
  const acc_t* grad_rows;
  scalar_t* gx;
  acc_t eps, num_classes, sum_w;

  explicit CeBackward(const CeBackwardArgs& args)
      : a(args),
        x(static_cast<const scalar_t*>(args.in.input)),
        cw(static_cast<const acc_t*>(args.in.class_w)),
        sw(static_cast<const acc_t*>(args.in.sample_w)),
        lse_hi(static_cast<const acc_t*>(args.lse_hi)),
        lse_lo(static_cast<const acc_t*>(args.lse_lo)),
        grad_rows(static_cast<const acc_t*>(args.grad_rows)),
        gx(static_cast<scalar_t*>(args.grad_input)),
        eps(static_cast<acc_t>(args.in.label_smoothing)),
        num_classes(static_cast<acc_t>(args.in.layout.C)),
        sum_w(static_cast<acc_t>(args.in.sum_w)) {}

  // p_c = exp(x_c - lse), lse = hi + lo (split_lse): the vectors subtract `ref` = hi, the lse
  // rounded to acc_t (x - ref is exact for the x near it, the ones with weight), and the rest,
  // exp(-lo), goes into the coefficient of p as `factor`.
  struct Shift {
    acc_t ref, factor;
  };
  C10_ALWAYS_INLINE Shift shift_for(int64_t r) const {
    const double d = -static_cast<double>(lse_lo[r]);  // half an ulp of lse, unless max is huge
    // exp(d) by its Taylor series where d is small (always, unless |lse| > ~1e4): no libm call
    // per row
    const double f = std::fabs(d) < 1e-3 ? 1.0 + d * (1.0 + 0.5 * d) : std::exp(d);
    return {lse_hi[r], static_cast<acc_t>(f)};
  }

  // p = exp(v - lse) from a Shift, in acc_t
  static acc_t p_of(const scalar_t& v, const Shift& sf) {
    return sf.factor * std::exp(static_cast<acc_t>(v) - sf.ref);
  }

  // The coefficients of row r; `t` is set to -1 when the row has no gradient (ignored).
  C10_ALWAYS_INLINE CeGradCoeffs<acc_t> coeffs(int64_t r, int64_t* t_out, acc_t* w_t_out) const {
    const int64_t t = load_target(a.in.target, a.in.target_int32, r);
    if (t == a.in.ignore_index || t < 0 || t >= a.in.layout.C) {
      *t_out = -1;
      return {0, 0, 0};
    }
    const acc_t w_t = cw ? cw[t] : acc_t(1);
    const acc_t g = grad_rows ? grad_rows[r] : static_cast<acc_t>(a.grad_scalar);
    acc_t scale = g * (sw ? sw[r] : acc_t(1));
    if (a.in.gamma != 0.0) {  // focal loss: d loss / d x_c = G (p_c - [c == t]) times the weights
      const CeLayout& l = a.in.layout;
      const double x_t = static_cast<double>(x[ce_row_offset(r, l.C, l.P) + t * l.P]);
      const double nll = (static_cast<double>(lse_hi[r]) - x_t) + static_cast<double>(lse_lo[r]);
      scale *= static_cast<acc_t>(focal_ce_grad_factor(nll, a.in.gamma));
    }
    *t_out = t;
    *w_t_out = w_t;
    return ce_index_grad_coeffs(scale, w_t, sum_w, eps, num_classes);
  }

  // The first n lanes of v, stored element by element: at the two ends of a row, where a masked
  // vector store measured 10% slower in a streamed 8192 x 1000 backward (AMD EPYC, AVX-512).
  static void store_lanes(scalar_t* p, const Vec& v, int64_t n) {
    alignas(64) acc_t lanes[Vec::size()];
    v.store(lanes);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(lanes[k]);
  }

  void row(int64_t r) const {
    const int64_t C = a.in.layout.C;
    const scalar_t* xr = x + r * C;
    scalar_t* gr = gx + r * C;
    constexpr int64_t V = Vec::size();
    int64_t t;
    acc_t w_t = 1;
    const CeGradCoeffs<acc_t> k = coeffs(r, &t, &w_t);
    if (t < 0) {
      std::fill(gr, gr + C, scalar_t(0));
      return;
    }
    const Shift sf = shift_for(r);
    const Vec va(k.a * sf.factor), ve(k.e), sh = shift_of(Vec(sf.ref));
    const bool with_e = k.e != acc_t(0);
    // the gradient of the n <= V classes from c on (partial vectors: a row's head before an
    // aligned address and its tail, with no scalar exp)
    // the logits kPrefetchBytes on, as in the forward (8192 x 1000: 5 to 8% of the backward at 2
    // threads, 12 to 14% at 1); not past the end of the input
    const int64_t row_bytes = C * static_cast<int64_t>(sizeof(scalar_t));
    const char* ahead = reinterpret_cast<const char*>(xr) + kPrefetchBytes;
    const bool prefetch = (r + 1) * row_bytes + kPrefetchBytes <= a.in.layout.N * row_bytes;
    auto vector_grad = [&](int64_t c, int64_t n) {
      if (prefetch) _mm_prefetch(ahead + c * static_cast<int64_t>(sizeof(scalar_t)), _MM_HINT_T0);
      Vec g = va * exp_shifted(n == V ? IO::load(xr + c) : IO::load(xr + c, n), sh);
      if (with_e) {
        g = g - ve * (cw ? (n == V ? Vec::loadu(cw + c) : Vec::loadu(cw + c, n)) : Vec(acc_t(1)));
      }
      return g;
    };
    int64_t c = 0;
    bool true_class_written = false;
    if constexpr (kStreamable<scalar_t>) {
      if (a.streaming_stores) {
        // head up to the first aligned element, then whole vectors straight to memory with the
        // true-class term folded in (the line is never read back, so no store may follow)
        c = vector_split(reinterpret_cast<uintptr_t>(gr), C, sizeof(float), V * sizeof(float)).head;
        if (c > 0) store_lanes(gr, vector_grad(0, c), c);
        const int64_t body = c;
        for (; c + V <= C; c += V) {
          Vec g = vector_grad(c, V);
          if (t >= c && t < c + V) {
            alignas(64) acc_t fix[V] = {};
            fix[t - c] = k.b;
            g = g - Vec::loadu(fix);
          }
          stream_store(reinterpret_cast<float*>(gr + c), g);
        }
        true_class_written = t >= body && t < c;
      }
    }
    for (; c + V <= C; c += V) IO::store(gr + c, vector_grad(c, V));
    if (c < C) store_lanes(gr + c, vector_grad(c, C - c), C - c);
    if (!true_class_written) gr[t] = static_cast<scalar_t>(ce_true_class_grad(k, p_of(xr[t], sf), w_t));
  }

  // The coefficients and shifts of the rows of one tile, one lane per row (see lane_coeffs).
  struct Lanes {
    alignas(64) acc_t ka[kTileLanes];   // coefficient of exp(x - ref): a * factor
    alignas(64) acc_t kb[kTileLanes];   // b, subtracted at the true class
    alignas(64) acc_t ke[kTileLanes];   // e, the label-smoothing term's coefficient of W_c
    alignas(64) acc_t ref[kTileLanes];  // Shift::ref
    // the true class, -1 for a row without gradient (as lanes of an integer vector)
    alignas(64) at::vec::int_same_size_t<acc_t> tt[kTileLanes];
  };

  // columns: V rows whose class c sits at base + c * stride + lane, read in place (a tile, or the
  // class planes of a K-dim input, `planes`, which are then prefetched, input and gradient), with
  // the coefficients of `L` from lane0 on; writes the whole gradient of the `n` real lanes: the
  // true class's -b folded in where the lane's class equals c, rows without gradient zeroed.
  template <typename io_t>
  void columns(const io_t* base, io_t* out, int64_t stride, int64_t n, const Lanes& L,
               int64_t lane0, bool with_e, bool planes = false) const {
    using CIO = Io<io_t>;
    using VI = Vectorized<at::vec::int_same_size_t<acc_t>>;
    const int64_t C = a.in.layout.C;
    const Vec zero(acc_t(0));
    const Vec va = Vec::loadu(L.ka + lane0), ve = Vec::loadu(L.ke + lane0), vb = Vec::loadu(L.kb + lane0);
    const Vec sh = shift_of(Vec::loadu(L.ref + lane0));
    const VI tt = VI::loadu(L.tt + lane0);
    const Vec valid = at::vec::cast<acc_t>(tt >= VI(0));
    for (int64_t c = 0; c < C; ++c) {
      if (planes) {  // both the logits and the gradient lines (the stores read them first)
        prefetch_plane(base + c * stride);
        prefetch_plane(out + c * stride);
      }
      const Vec v = n == Vec::size() ? CIO::load(base + c * stride) : CIO::load(base + c * stride, n);
      Vec g = va * exp_shifted(v, sh);
      if (with_e) g = g - ve * Vec(cw ? cw[c] : acc_t(1));
      g = g - (vb & at::vec::cast<acc_t>(tt == VI(static_cast<at::vec::int_same_size_t<acc_t>>(c))));
      CIO::store(out + c * stride, Vec::blendv(zero, g, valid), n);
    }
  }

  // Fill `L` for the `lanes` rows from r0 on; the other lanes get zeros. Returns whether any lane
  // has a label-smoothing term. For float32 and the half types (acc_t float) the arithmetic runs on
  // all lanes at once: row by row, coeffs and shift_for had cost half of the K-dim backward at
  // C = 19 and most of the small-C one.
  bool lane_coeffs(Lanes& L, int64_t r0, int64_t lanes) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (a.in.gamma == 0.0) return lane_coeffs_vec(L, r0, lanes);
    }
    return lane_coeffs_rows(L, r0, lanes);
  }

  // lane_coeffs' arithmetic in vectors, with the results of coeffs() and shift_for() bit for bit:
  // ce_index_grad_coeffs' formulas in acc_t, shift_for's Taylor factor in float64 rounded once
  // (taylor_exp_f64), and lanes with |lo| >= 1e-3 (logits beyond ~1e4) through exp in float64.
  // Only the target checks and the gather of W_t go lane by lane. Not for focal loss
  // (gamma != 0), whose factor needs each row's p_t.
  bool lane_coeffs_vec(Lanes& L, int64_t r0, int64_t lanes) const {
    using I = at::vec::int_same_size_t<acc_t>;
    constexpr int64_t V = Vec::size();
    const int64_t C = a.in.layout.C, ignore = a.in.ignore_index;
    alignas(64) acc_t w_t[kTileLanes];
    for (int64_t j = 0; j < kTileLanes; ++j) {
      const int64_t t = j < lanes ? load_target(a.in.target, a.in.target_int32, r0 + j) : ignore;
      const bool ok = t != ignore && t >= 0 && t < C;
      L.tt[j] = ok ? static_cast<I>(t) : I(-1);
      w_t[j] = ok ? (cw ? cw[t] : acc_t(1)) : acc_t(0);
    }
    const Vec zero(acc_t(0)), keep(acc_t(1) - eps), smooth(eps / num_classes);
    const Vec smooth_sum_w = smooth * Vec(sum_w);
    Vec any_e = zero;
    for (int64_t j = 0; j < kTileLanes; j += V) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(V, lanes - j));
      const Vec valid = at::vec::cast<acc_t>(Vectorized<I>::loadu(L.tt + j) >= Vectorized<I>(I(0)));
      Vec scale = grad_rows ? Vec::loadu(grad_rows + r0 + j, n) : Vec(static_cast<acc_t>(a.grad_scalar));
      if (sw) scale = scale * Vec::loadu(sw + r0 + j, n);
      const Vec w = Vec::loadu(w_t + j);
      const Vec ka = scale * (keep * w + smooth_sum_w), kb = scale * keep * w, ke = scale * smooth;
      const Vec hi = Vec::loadu(lse_hi + r0 + j, n), d = zero - Vec::loadu(lse_lo + r0 + j, n);
      Vec factor = taylor_exp_f64(d);
      const Vec far = Vec::blendv(zero, d.abs() >= Vec(acc_t(1e-3)), valid);
      if (any_lane(far)) {
        alignas(64) acc_t dv[V], fv[V];
        d.store(dv);
        factor.store(fv);
        for (int64_t k = 0; k < n; ++k) {
          if (std::fabs(dv[k]) >= acc_t(1e-3)) fv[k] = static_cast<acc_t>(std::exp(static_cast<double>(dv[k])));
        }
        factor = Vec::loadu(fv);
      }
      Vec::blendv(zero, ka * factor, valid).store(L.ka + j);
      Vec::blendv(zero, kb, valid).store(L.kb + j);
      const Vec e = Vec::blendv(zero, ke, valid);
      e.store(L.ke + j);
      Vec::blendv(zero, hi, valid).store(L.ref + j);
      any_e = any_e | (e != zero);
    }
    return any_lane(any_e);
  }

  bool lane_coeffs_rows(Lanes& L, int64_t r0, int64_t lanes) const {
    bool with_e = false;
    for (int64_t j = 0; j < kTileLanes; ++j) {
      int64_t t = -1;
      if (j < lanes) {
        acc_t w_t;
        const CeGradCoeffs<acc_t> k = coeffs(r0 + j, &t, &w_t);
        const Shift sf = t < 0 ? Shift{acc_t(0), acc_t(0)} : shift_for(r0 + j);
        L.ka[j] = k.a * sf.factor;
        L.kb[j] = k.b;
        L.ke[j] = k.e;
        L.ref[j] = sf.ref;
        with_e = with_e || k.e != acc_t(0);
      } else {
        L.ka[j] = L.kb[j] = L.ke[j] = L.ref[j] = acc_t(0);
      }
      L.tt[j] = static_cast<at::vec::int_same_size_t<acc_t>>(t);
    }
    return with_e;
  }

  // C < kFlatMaxC, float32: the `rows` rows from r on are one contiguous block of rows * C
  // logits, cut into flat vectors with no transpose. Lane i of flat vector f holds element f + i of the block,
  // of row ridx[f + i] = (f + i) / C, whose coefficients spread_rows moves into that lane;
  // wflat[f + i] = W of its class. The true class of each row is fixed up afterwards, in float.
  void flat_tile(int64_t r, int64_t rows, const int32_t* ridx, const acc_t* wflat) const {
    static_assert(std::is_same_v<scalar_t, float>, "the flat tile path is float32 only");
    constexpr int64_t V = Vec::size();
    const int64_t C = a.in.layout.C;
    Lanes L;
    const bool with_e = lane_coeffs(L, r, rows);
    const float* xb = x + r * C;
    float* gb = gx + r * C;
    const int64_t count = rows * C;
    for (int64_t f = 0; f < count; f += V) {
      const int64_t n = std::min<int64_t>(V, count - f);
      const Vec v = n == V ? Vec::loadu(xb + f) : Vec::loadu(xb + f, n);
      Vec g = spread_rows(L.ka, ridx + f) * exp_shifted(v, shift_of(spread_rows(L.ref, ridx + f)));
      if (with_e) g = g - spread_rows(L.ke, ridx + f) * Vec::loadu(wflat + f);
      IO::store(gb + f, g, n);
    }
    for (int64_t j = 0; j < rows; ++j) {
      float* gr = gb + j * C;
      if (L.tt[j] < 0) {
        std::fill(gr, gr + C, 0.0f);
      } else {
        gr[L.tt[j]] -= L.kb[j];  // a p_t - e W_t - b, as the tile path
      }
    }
  }

  void chunk(int64_t chunk_index) const {
    const CeLayout& l = a.in.layout;
    constexpr int64_t V = Vec::size();
    Lanes L;
    if (l.P > 1) {
      const int64_t n = chunk_index / l.chunks_per_n;
      const int64_t p0 = (chunk_index % l.chunks_per_n) * l.rows_per_chunk;
      const int64_t p1 = std::min(l.P, p0 + l.rows_per_chunk);
      const int64_t offset = n * l.C * l.P;
      for (int64_t p = p0; p < p1; p += V) {
        const int64_t lanes = std::min<int64_t>(V, p1 - p);
        const int64_t r0 = n * l.P + p;
        const bool with_e = lane_coeffs(L, r0, lanes);
        columns<scalar_t>(x + offset + p, gx + offset + p, l.P, lanes, L, 0, with_e, true);
      }
      return;
    }
    const int64_t r0 = chunk_index * l.rows_per_chunk;
    const int64_t r1 = std::min(l.N, r0 + l.rows_per_chunk);
    const bool flat = std::is_same_v<scalar_t, float> && l.C < kFlatMaxC && !a.streaming_stores;
    if (!l.tiled && !flat) {
      for (int64_t r = r0; r < r1; ++r) row(r);
      if (a.streaming_stores) stream_fence();  // streamed lines visible before the chunk ends
      return;
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      // row of each element of a tile's flat block, and W of its class (padded to whole vectors)
      alignas(64) int32_t ridx[kTileLanes * kFlatMaxC + kTileLanes];
      alignas(64) float wflat[kTileLanes * kFlatMaxC + kTileLanes];
      const int64_t block = kTileLanes * l.C;
      for (int64_t f = 0; f < block + kTileLanes; ++f) {
        ridx[f] = f < block ? static_cast<int32_t>(f / l.C) : 0;
        wflat[f] = f < block && cw ? cw[f % l.C] : 1.0f;
      }
      for (int64_t r = r0; r < r1; r += kTileLanes) {
        flat_tile(r, std::min<int64_t>(kTileLanes, r1 - r), ridx, wflat);
      }
      return;
    }
    alignas(64) acc_t tile[2 * kTileLanes * kTileLanes];
    alignas(64) acc_t gtile[2 * kTileLanes * kTileLanes];
    for (int64_t r = r0; r < r1; r += kTileLanes) {
      const int64_t rows = std::min<int64_t>(kTileLanes, r1 - r);
      CeForward<scalar_t>::pack_tile(x + r * l.C, rows, l.C, tile);
      const bool with_e = lane_coeffs(L, r, rows);
      for (int64_t j = 0; j < kTileLanes; j += V) {
        columns<acc_t>(tile + j, gtile + j, kTileLanes, V, L, j, with_e);
      }
      for (int64_t j = 0; j < rows; ++j) {
        scalar_t* gr = gx + (r + j) * l.C;
        for (int64_t c = 0; c < l.C; ++c) gr[c] = static_cast<scalar_t>(gtile[c * kTileLanes + j]);
      }
    }
  }
};

template <typename scalar_t>
void ce_backward_chunk(const CeBackwardArgs& args, int64_t chunk) {
  CeBackward<scalar_t>(args).chunk(chunk);
}

// ---------------------------------------------------------------------------------------------
// Binary cross-entropy, flat over the rows of a chunk:
//   loss = w * (neg (1 - t) x + (neg (1 - t) + pos t) softplus(-x))
//   grad = g * w * (neg (1 - t) sigmoid(x) - pos t sigmoid(-x))

template <typename scalar_t>
struct Bce {
  using acc_t = acc_type_t<scalar_t>;
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr int64_t V = Vec::size();

  const BceArgs& a;
  const scalar_t* x;
  const scalar_t* t;
  const acc_t* neg_w;
  const acc_t* pos_w;
  const acc_t* elem_w;
  const acc_t* elem_pos_w;
  const acc_t* sw;

  explicit Bce(const BceArgs& args)
      : a(args),
        x(static_cast<const scalar_t*>(args.input)),
        t(static_cast<const scalar_t*>(args.target)),
        neg_w(static_cast<const acc_t*>(args.neg_label_w)),
        pos_w(static_cast<const acc_t*>(args.pos_label_w)),
        elem_w(static_cast<const acc_t*>(args.elem_w)),
        elem_pos_w(static_cast<const acc_t*>(args.elem_pos_w)),
        sw(static_cast<const acc_t*>(args.sample_w)) {}

  static Vec load_acc(const acc_t* p, int64_t n) {
    return n == V ? Vec::loadu(p) : Vec::loadu(p, n);
  }

  // The weights of `n` elements starting at flat index i (chunk-relative offset j).
  void weights(int64_t i, int64_t j, int64_t n, int64_t r0, Vec* neg, Vec* pos, Vec* w) const {
    *neg = neg_w ? load_acc(neg_w + j, n) : Vec(acc_t(1));
    *pos = pos_w ? load_acc(pos_w + j, n) : Vec(acc_t(1));
    if (elem_pos_w) *pos = *pos * load_acc(elem_pos_w + i, n);
    *w = elem_w ? load_acc(elem_w + i, n) : Vec(acc_t(1));
    if (sw) {
      alignas(64) acc_t buf[V];
      for (int64_t k = 0; k < n; ++k) buf[k] = sw[(i + k) / a.L];
      for (int64_t k = n; k < V; ++k) buf[k] = acc_t(0);
      *w = *w * Vec::loadu(buf);
    }
    (void)r0;
  }

  // softplus(-x) = max(-x, 0) + log1p(exp(-|x|)). In float, log1p(e) for e = exp(-|x|) in (0, 1]
  // is 2 atanh(s) = 2 s + 2 s z Q(z) with s = e / (2 + e) <= 1/3 and z = s^2 <= 1/9: Q a cubic
  // fit of (atanh(s) / s - 1) / z (relative error 4e-9), no log call and no cancellation as e -> 0;
  // 2 ulp at worst. float64 keeps log(u) * e / (u - 1), u = 1 + e (exact where u rounds to 1).
  static Vec softplus_neg(const Vec& v) {
    const Vec zero(acc_t(0)), one(acc_t(1));
    const Vec e = exp_shifted(zero - v.abs(), zero);
    Vec log1p_e;
    if constexpr (std::is_same_v<acc_t, float>) {
      const Vec s = e / (Vec(2.0f) + e);
      const Vec z = s * s;
      Vec q(1.408916712e-01f);
      q = at::vec::fmadd(q, z, Vec(1.398030072e-01f));
      q = at::vec::fmadd(q, z, Vec(2.001245469e-01f));
      q = at::vec::fmadd(q, z, Vec(3.333315849e-01f));
      const Vec s2 = s + s;
      log1p_e = at::vec::fmadd(s2 * z, q, s2);
    } else {
      const Vec u = one + e;
      const Vec d = u - one;
      log1p_e = Vec::blendv(u.log() * (e / d), e, d == zero);
    }
    return at::vec::maximum(zero - v, zero) + log1p_e;
  }

  // The sigmoid focal loss (gamma != 0 or alpha >= 0) runs element by element through the shared
  // bce_focal_loss / bce_focal_grad: correct first; the plain loss keeps the vector path.
  bool focal() const { return a.gamma != 0.0 || a.alpha >= 0.0; }

  void scalar_weights(int64_t i, int64_t j, acc_t* neg, acc_t* pos, acc_t* w) const {
    *neg = neg_w ? neg_w[j] : acc_t(1);
    *pos = pos_w ? pos_w[j] : acc_t(1);
    if (elem_pos_w) *pos *= elem_pos_w[i];
    *w = elem_w ? elem_w[i] : acc_t(1);
    if (sw) *w *= sw[i / a.L];
  }

  double focal_forward_chunk(int64_t begin, int64_t count) const {
    scalar_t* out = static_cast<scalar_t*>(a.loss_out);
    const acc_t gamma = static_cast<acc_t>(a.gamma), alpha = static_cast<acc_t>(a.alpha);
    double total = 0;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = begin + j;
      acc_t neg, pos, w;
      scalar_weights(i, j, &neg, &pos, &w);
      const acc_t loss = w * bce_focal_loss(static_cast<acc_t>(x[i]), static_cast<acc_t>(t[i]), neg, pos, gamma, alpha);
      if (out) out[i] = static_cast<scalar_t>(loss);
      total += static_cast<double>(loss);
    }
    return total;
  }

  void focal_backward_chunk(int64_t begin, int64_t count) const {
    const acc_t* ge = static_cast<const acc_t*>(a.grad_elems);
    scalar_t* gx = static_cast<scalar_t*>(a.grad_input);
    const acc_t gamma = static_cast<acc_t>(a.gamma), alpha = static_cast<acc_t>(a.alpha);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = begin + j;
      acc_t neg, pos, w;
      scalar_weights(i, j, &neg, &pos, &w);
      const acc_t g = ge ? ge[i] : static_cast<acc_t>(a.grad_scalar);
      gx[i] = static_cast<scalar_t>(
          g * w * bce_focal_grad(static_cast<acc_t>(x[i]), static_cast<acc_t>(t[i]), neg, pos, gamma, alpha));
    }
  }

  double forward_chunk(int64_t chunk) const {
    const int64_t r0 = chunk * a.rows_per_chunk;
    const int64_t r1 = std::min(a.rows, r0 + a.rows_per_chunk);
    const int64_t begin = r0 * a.L, count = (r1 - r0) * a.L;
    if (focal()) return focal_forward_chunk(begin, count);
    scalar_t* out = static_cast<scalar_t*>(a.loss_out);
    const Vec one(acc_t(1)), zero(acc_t(0));
    double total = 0;
    Vec block(acc_t(0));
    int64_t in_block = 0;
    for (int64_t j = 0; j < count; j += V) {
      const int64_t n = std::min<int64_t>(V, count - j);
      const int64_t i = begin + j;
      const Vec vx = n == V ? IO::load(x + i) : IO::load(x + i, n);
      const Vec vt = n == V ? IO::load(t + i) : IO::load(t + i, n);
      Vec neg, pos, w;
      weights(i, j, n, r0, &neg, &pos, &w);
      const Vec nt = neg * (one - vt);
      Vec loss = w * (nt * vx + (nt + pos * vt) * softplus_neg(vx));
      if (n < V) loss = Vec::set(zero, loss, n);
      if (out) IO::store(out + i, loss, n);
      block = block + loss;
      // fold into the double total every 64 vectors, so float lanes never sum long runs
      if (++in_block == 64) {
        total += static_cast<double>(reduce_sum(block));
        block = zero;
        in_block = 0;
      }
    }
    return total + static_cast<double>(reduce_sum(block));
  }

  void backward_chunk(int64_t chunk) const {
    const int64_t r0 = chunk * a.rows_per_chunk;
    const int64_t r1 = std::min(a.rows, r0 + a.rows_per_chunk);
    const int64_t begin = r0 * a.L, count = (r1 - r0) * a.L;
    if (focal()) return focal_backward_chunk(begin, count);
    const acc_t* ge = static_cast<const acc_t*>(a.grad_elems);
    scalar_t* gx = static_cast<scalar_t*>(a.grad_input);
    const Vec one(acc_t(1)), zero(acc_t(0)), gs(static_cast<acc_t>(a.grad_scalar));
    bool stream = false;
    int64_t head = 0;  // elements before the first vector-aligned gradient address
    if constexpr (kStreamable<scalar_t>) {
      stream = a.streaming_stores;
      if (stream) head = vector_split(reinterpret_cast<uintptr_t>(gx + begin), count, sizeof(float), V * sizeof(float)).head;
    }
    for (int64_t j = 0, n = 0; j < count; j += n) {
      n = j == 0 && head > 0 ? head : std::min<int64_t>(V, count - j);
      const int64_t i = begin + j;
      const Vec vx = n == V ? IO::load(x + i) : IO::load(x + i, n);
      const Vec vt = n == V ? IO::load(t + i) : IO::load(t + i, n);
      Vec neg, pos, w;
      weights(i, j, n, r0, &neg, &pos, &w);
      // sigmoid(x) and sigmoid(-x) from one exp(-|x|), exact in both tails
      const Vec e = exp_shifted(zero - vx.abs(), zero);
      const Vec inv = one / (one + e);
      const Vec nonneg = vx >= zero;  // all-ones lanes where x >= 0
      const Vec sig = Vec::blendv(e * inv, inv, nonneg);
      const Vec sig_neg = Vec::blendv(inv, e * inv, nonneg);
      const Vec g = ge ? load_acc(ge + i, n) : gs;
      const Vec grad = g * w * (neg * (one - vt) * sig - pos * vt * sig_neg);
      if constexpr (kStreamable<scalar_t>) {
        if (stream && n == V) {
          stream_store(reinterpret_cast<float*>(gx + i), grad);
          continue;
        }
      }
      IO::store(gx + i, grad, n);
    }
    if (stream) stream_fence();
  }
};

template <typename scalar_t>
double bce_forward_chunk(const BceArgs& args, int64_t chunk) {
  return Bce<scalar_t>(args).forward_chunk(chunk);
}

template <typename scalar_t>
void bce_backward_chunk(const BceArgs& args, int64_t chunk) {
  Bce<scalar_t>(args).backward_chunk(chunk);
}

// The label sums of the dynamic BCE weights: each vector lane adds up 64 targets in acc_t (exact
// for 0/1 targets), then goes into the float64 sums; a fixed order, so the same doubles for any
// thread count.
template <typename scalar_t>
void bce_label_sums(const void* target, int64_t L, int64_t r0, int64_t r1, double* acc) {
  using acc_t = acc_type_t<scalar_t>;
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kBlockRows = 64;
  const scalar_t* t = static_cast<const scalar_t*>(target);
  if (L < 2 * V) {
    // few labels: V rows at a time are L flat vectors, lane i of vector k holding label
    // (k V + i) % L; blocks of up to 64 V rows so, the last rows (fewer than V) element by element
    Vec sums[2 * V];
    alignas(64) acc_t lanes[V];
    int16_t label_of[2 * V * V];
    for (int64_t f = 0; f < L * V; ++f) label_of[f] = static_cast<int16_t>(f % L);
    int64_t r = r0;
    for (int64_t rows; (rows = std::min(kBlockRows * V, (r1 - r) / V * V)) > 0; r += rows) {
      for (int64_t k = 0; k < L; ++k) sums[k] = Vec(acc_t(0));
      for (int64_t p = r; p < r + rows; p += V) {
        const scalar_t* tp = t + p * L;
        for (int64_t k = 0; k < L; ++k) sums[k] = sums[k] + IO::load(tp + k * V);
      }
      for (int64_t k = 0; k < L; ++k) {
        sums[k].store(lanes);
        for (int64_t i = 0; i < V; ++i) acc[label_of[k * V + i]] += static_cast<double>(lanes[i]);
      }
    }
    for (; r < r1; ++r)
      for (int64_t l = 0; l < L; ++l) acc[l] += static_cast<double>(t[r * L + l]);
    return;
  }
  const int64_t full = L - L % V;
  std::vector<acc_t> block(static_cast<size_t>(L));
  for (int64_t rb = r0; rb < r1; rb += kBlockRows) {
    const int64_t re = std::min(r1, rb + kBlockRows);
    std::fill(block.begin(), block.end(), acc_t(0));
    for (int64_t r = rb; r < re; ++r) {  // row by row: the targets stream in order
      const scalar_t* tr = t + r * L;
      int64_t l = 0;
      for (; l < full; l += V) (Vec::loadu(block.data() + l) + IO::load(tr + l)).store(block.data() + l);
      for (; l < L; ++l) block[l] += static_cast<acc_t>(tr[l]);
    }
    for (int64_t l = 0; l < L; ++l) acc[l] += static_cast<double>(block[l]);
  }
}

#define FWL_STR2(x) #x
#define FWL_STR(x) FWL_STR2(x)

inline const KernelTable* kernel_table() {
  static const KernelTable table = {
      FWL_STR(CPU_CAPABILITY),
      static_cast<int>(Vectorized<float>::size() * sizeof(float)),
      {&ce_forward_chunk<float>, &ce_forward_chunk<double>, &ce_forward_chunk<c10::Half>,
       &ce_forward_chunk<c10::BFloat16>},
      {&ce_backward_chunk<float>, &ce_backward_chunk<double>, &ce_backward_chunk<c10::Half>,
       &ce_backward_chunk<c10::BFloat16>},
      {&bce_forward_chunk<float>, &bce_forward_chunk<double>, &bce_forward_chunk<c10::Half>,
       &bce_forward_chunk<c10::BFloat16>},
      {&bce_backward_chunk<float>, &bce_backward_chunk<double>, &bce_backward_chunk<c10::Half>,
       &bce_backward_chunk<c10::BFloat16>},
      {&bce_label_sums<float>, &bce_label_sums<double>, &bce_label_sums<c10::Half>,
       &bce_label_sums<c10::BFloat16>},
  };
  return &table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_wloss

// The module: import it and read `kernel_table`, a capsule fused_wloss._C.set_cpu_kernels takes.
#define FWL_CONCAT2(a, b) a##b
#define FWL_CONCAT(a, b) FWL_CONCAT2(a, b)

static PyModuleDef fwl_isa_module = {PyModuleDef_HEAD_INIT, FWL_STR(TORCH_EXTENSION_NAME),
                                     "fused_wloss CPU kernels for one instruction set", -1, nullptr};

PyMODINIT_FUNC FWL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&fwl_isa_module);
  if (m == nullptr) return nullptr;
  const void* table = fused_wloss::cpu::kernel_table();
  PyObject* capsule =
      PyCapsule_New(const_cast<void*>(table), FWL_KERNEL_TABLE_CAPSULE, nullptr);
  if (capsule == nullptr || PyModule_AddObject(m, "kernel_table", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
