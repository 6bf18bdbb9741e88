// Cross-entropy backward: one chunk of rows (or of pixels) per call, from the forward's lse.
#pragma once

#include "ce_forward.h"  // CeForward::pack_tile, shared by the tiled backward
#include "vec_math.h"

namespace fused_wloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

// d loss / d x_c = a p_c - b [c == t] - e W_c (see ce_index_grad_coeffs)

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
    // p_t before any store: the gradient may be written over the logits (cross_entropy_grad_)
    const acc_t p_t = p_of(xr[t], sf);
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
    if (!true_class_written) gr[t] = static_cast<scalar_t>(ce_true_class_grad(k, p_t, w_t));
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_wloss
