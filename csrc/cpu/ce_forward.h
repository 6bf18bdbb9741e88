// Cross-entropy forward: one chunk of rows (or of pixels, for K-dim inputs) per call.
// Layouts: see kernels_impl.h.
#pragma once

#include "vec_math.h"

namespace fused_wloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

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
  void* loss_out;     // scalar_t, or acc_t when loss_acc: see put_loss
  bool loss_acc;
  double eps, num_classes, sum_w;
  bool smooth;

  explicit CeForward(const CeForwardArgs& args)
      : a(args),
        x(static_cast<const scalar_t*>(args.in.input)),
        cw(static_cast<const acc_t*>(args.in.class_w)),
        sw(static_cast<const acc_t*>(args.in.sample_w)),
        lse_hi_out(static_cast<acc_t*>(args.lse_hi_out)),
        lse_lo_out(static_cast<acc_t*>(args.lse_lo_out)),
        loss_out(args.loss_out),
        loss_acc(args.loss_out_acc),
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
    if (loss_out) put_loss(row, loss);
  }

  // One element of the "none" output: in the input's dtype, or (loss_acc, under autocast) in
  // acc_t, rounded once from the float64 loss.
  C10_ALWAYS_INLINE void put_loss(int64_t row, double loss) const {
    if (loss_acc) {
      static_cast<acc_t*>(loss_out)[row] = static_cast<acc_t>(loss);
    } else {
      static_cast<scalar_t*>(loss_out)[row] = static_cast<scalar_t>(loss);
    }
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
      if (loss_out) put_loss(row0 + j, loss);
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
      if (std::is_same_v<scalar_t, float> || loss_acc) {  // acc_t is float here
        store(static_cast<float*>(loss_out) + row0, join(loss_f[0], loss_f[1]));
      } else {
        alignas(64) float buf[kTileLanes];
        _mm512_store_ps(buf, join(loss_f[0], loss_f[1]));
        scalar_t* const out = static_cast<scalar_t*>(loss_out) + row0;
        for (int64_t j = 0; j < lanes; ++j) out[j] = static_cast<scalar_t>(buf[j]);
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_wloss
