// Cross-entropy with probability (soft) targets: forward and backward, one chunk per call.
//
// With q' = (1 - eps) q + eps / C the smoothed targets, W the class weights and m the row maximum,
//   loss = s sum_c W_c q'_c (lse - x_c) = s (B log_s - D),
//   B = sum_c W_c q'_c,  D = sum_c W_c q'_c (x_c - m) <= 0,  lse = m + log_s,
// so the forward reads each row's logits twice from cache (the max, then one sweep for the sum of
// exponentials, B and D together) and its targets once, and never forms a difference of two large
// numbers. B and D are summed over the smoothed q' itself (not as (1 - eps) sum W q + eps / C sum W),
// so that an infinite logit meets each class's one weight W_c q'_c, as in the reference. It saves the lse (hi + lo, split_lse) and B per row; the backward reads the logits and
// the targets once and writes
//   d loss / d x_c = g s (B p_c - W_c q'_c),  p_c = exp(x_c - lse).
// Layouts (CeLayout): P == 1 row by row, vectors along the classes (a partial vector at a row's
// end); P > 1 (K-dim) vectors along the pixels, one pixel per lane, the class planes read in place.
#pragma once

#include "vec_math.h"

namespace fused_wloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

// target_t: scalar_t, or float for float32 targets with float16/bfloat16 logits.
template <typename scalar_t, typename target_t = scalar_t>
struct CeProb {
  using acc_t = acc_type_t<scalar_t>;
  using IO = Io<scalar_t>;
  using TIO = Io<target_t>;
  using Vec = typename IO::Vec;
  static_assert(std::is_same_v<Vec, typename TIO::Vec>, "targets load as the logits' acc_t vectors");
  static constexpr int64_t V = Vec::size();

  const CeProbArgs& a;
  const scalar_t* x;
  const target_t* q;
  const acc_t* cw;
  const acc_t* sw;
  const int64_t C, P, rows;
  const double keep, spread;  // q' = keep q + spread
  const bool smooth;

  explicit CeProb(const CeProbArgs& args)
      : a(args),
        x(static_cast<const scalar_t*>(args.input)),
        q(static_cast<const target_t*>(args.target)),
        cw(static_cast<const acc_t*>(args.class_w)),
        sw(static_cast<const acc_t*>(args.sample_w)),
        C(args.layout.C),
        P(args.layout.P),
        rows(args.layout.N * args.layout.P),
        keep(1.0 - args.label_smoothing),
        spread(args.layout.C > 0 ? args.label_smoothing / static_cast<double>(args.layout.C) : 0.0),
        smooth(args.label_smoothing > 0.0) {}

  // The chunk's rows: [r0, r1) of the (N * P) elements, as make_ce_layout cut them.
  void chunk_rows(int64_t chunk, int64_t* n, int64_t* p0, int64_t* p1) const {
    const CeLayout& l = a.layout;
    if (P > 1) {
      *n = chunk / l.chunks_per_n;
      *p0 = (chunk % l.chunks_per_n) * l.rows_per_chunk;
      *p1 = std::min(P, *p0 + l.rows_per_chunk);
    } else {
      *n = 0;
      *p0 = chunk * l.rows_per_chunk;
      *p1 = std::min(l.N, *p0 + l.rows_per_chunk);
    }
  }

  // The epilogue of one element (row r): from its maximum m, sum of exponentials s and the sums
  // b = sum W q', d = sum W q' (x - m); in float64.
  void finish(int64_t r, double m, double s, double b, double d, CePartial& part) const {
    const double log_s = std::log(s);
    const double sr = sw ? static_cast<double>(sw[r]) : 1.0;
    const double loss = sr * (b * log_s - d);
    const LseParts<acc_t> lse = split_lse<acc_t>(m, log_s);
    acc_t* stats = static_cast<acc_t*>(a.stats_out);
    stats[r] = lse.hi;
    stats[rows + r] = lse.lo;
    stats[2 * rows + r] = static_cast<acc_t>(b);
    if (a.loss_out) {
      if (a.loss_out_acc) {
        static_cast<acc_t*>(a.loss_out)[r] = static_cast<acc_t>(loss);
      } else {
        static_cast<scalar_t*>(a.loss_out)[r] = static_cast<scalar_t>(loss);
      }
    }
    part.loss_sum += loss;
    part.weight_sum += sr;
    part.valid += 1;
  }

  // ---- forward ----

  void forward_chunk(int64_t chunk, CePartial* out) const {
    CePartial part{0, 0, 0, -1, 0};
    int64_t n, p0, p1;
    chunk_rows(chunk, &n, &p0, &p1);
    if (P > 1) {
      for (int64_t p = p0; p < p1; p += V) forward_pixels(n, p, std::min<int64_t>(V, p1 - p), part);
    } else {
      for (int64_t r = p0; r < p1; ++r) forward_row(r, part);
    }
    *out = part;
  }

  void forward_row(int64_t r, CePartial& part) const {
    const scalar_t* xr = x + r * C;
    const target_t* qr = q + r * C;
    const int64_t full = C - C % V, tail = C - full;
    const Vec neg_inf(-std::numeric_limits<acc_t>::infinity()), zero(acc_t(0));
    Vec m0 = neg_inf, m1 = neg_inf;
    int64_t c = 0;
    for (; c + 2 * V <= C; c += 2 * V) {
      m0 = running_max(m0, IO::load(xr + c));
      m1 = running_max(m1, IO::load(xr + c + V));
    }
    for (; c < full; c += V) m0 = running_max(m0, IO::load(xr + c));
    const Vec xt = tail > 0 ? load_partial(xr + full, tail, neg_inf) : neg_inf;
    const acc_t m = reduce_max(running_max(running_max(m0, m1), xt));

    const Vec sh = shift_of(Vec(m)), K(static_cast<acc_t>(keep)), E(static_cast<acc_t>(spread));
    Vec s0 = zero, s1 = zero, b = zero, dsum = zero;
    auto sweep = [&](const Vec& d, const Vec& qv, const Vec& wv, Vec& s_acc) {
      s_acc = s_acc + exp_of_difference(d);
      const Vec qs = smooth ? at::vec::fmadd(K, qv, E) : qv;
      const Vec wq = cw ? qs * wv : qs;
      b = b + wq;
      dsum = at::vec::fmadd(wq, d, dsum);
    };
    for (c = 0; c + 2 * V <= C; c += 2 * V) {
      sweep(IO::load(xr + c) + sh, TIO::load(qr + c), cw ? Vec::loadu(cw + c) : zero, s0);
      sweep(IO::load(xr + c + V) + sh, TIO::load(qr + c + V), cw ? Vec::loadu(cw + c + V) : zero, s1);
    }
    for (; c < full; c += V) sweep(IO::load(xr + c) + sh, TIO::load(qr + c), cw ? Vec::loadu(cw + c) : zero, s0);
    if (tail > 0) {
      // lanes past the row: exp(-inf) = 0 in the sum, and 0 (not 0 * -inf, nor the spread) in B, D
      s1 = s1 + exp_of_difference(xt + sh);
      const Vec d = Vec::set(zero, xt + sh, tail);
      const Vec qv = TIO::load(qr + full, tail);
      const Vec qs = smooth ? at::vec::fmadd(K, qv, E) : qv;
      const Vec wq = Vec::set(zero, cw ? qs * Vec::loadu(cw + full, tail) : qs, tail);
      b = b + wq;
      dsum = at::vec::fmadd(wq, d, dsum);
    }
    finish(r, m, reduce_sum(s0 + s1), reduce_sum(b), reduce_sum(dsum), part);
  }

  // K-dim: `lanes` pixels p.. of sample n, one per lane; class c at + c * P.
  void forward_pixels(int64_t n, int64_t p, int64_t lanes, CePartial& part) const {
    const scalar_t* xp = x + n * C * P + p;
    const target_t* qp = q + n * C * P + p;
    auto load_x = [&](int64_t c) { return lanes == V ? IO::load(xp + c * P) : IO::load(xp + c * P, lanes); };
    auto load_q = [&](int64_t c) { return lanes == V ? TIO::load(qp + c * P) : TIO::load(qp + c * P, lanes); };
    Vec m(-std::numeric_limits<acc_t>::infinity());
    for (int64_t c = 0; c < C; ++c) {
      prefetch_plane(xp + c * P);
      m = running_max(m, load_x(c));
    }
    const Vec sh = shift_of(m), zero(acc_t(0)), K(static_cast<acc_t>(keep)), E(static_cast<acc_t>(spread));
    Vec s = zero, b = zero, dsum = zero;
    for (int64_t c = 0; c < C; ++c) {
      prefetch_plane(qp + c * P);
      const Vec d = load_x(c) + sh;
      s = s + exp_of_difference(d);
      const Vec qv = load_q(c);
      const Vec wq = (smooth ? at::vec::fmadd(K, qv, E) : qv) * Vec(cw ? cw[c] : acc_t(1));
      b = b + wq;
      dsum = at::vec::fmadd(wq, d, dsum);
    }
    alignas(64) acc_t mb[V], sb[V], bb[V], db[V];
    m.store(mb);
    s.store(sb);
    b.store(bb);
    dsum.store(db);
    const int64_t r0 = n * P + p;
    for (int64_t j = 0; j < lanes; ++j) finish(r0 + j, mb[j], sb[j], bb[j], db[j], part);
  }

  // ---- backward ----

  acc_t upstream(int64_t r) const {
    const acc_t* g = static_cast<const acc_t*>(a.grad_rows);
    const acc_t s = sw ? sw[r] : acc_t(1);
    return (g ? g[r] : static_cast<acc_t>(a.grad_scalar)) * s;
  }

  void backward_chunk(int64_t chunk) const {
    int64_t n, p0, p1;
    chunk_rows(chunk, &n, &p0, &p1);
    if (P > 1) {
      for (int64_t p = p0; p < p1; p += V) backward_pixels(n, p, std::min<int64_t>(V, p1 - p));
    } else {
      for (int64_t r = p0; r < p1; ++r) backward_row(r);
    }
  }

  // grad = A p - (K q + E) W with A = g s B, K = g s keep, E = g s spread; p = exp(x - hi) e^-lo.
  void backward_row(int64_t r) const {
    const acc_t* stats = static_cast<const acc_t*>(a.stats);
    const acc_t gs = upstream(r);
    const acc_t factor = static_cast<acc_t>(std::exp(-static_cast<double>(stats[rows + r])));
    const Vec A(gs * stats[2 * rows + r] * factor), K(static_cast<acc_t>(gs * keep)),
        E(static_cast<acc_t>(gs * spread)), sh(-stats[r]);
    const scalar_t* xr = x + r * C;
    const target_t* qr = q + r * C;
    scalar_t* gr = static_cast<scalar_t*>(a.grad_input) + r * C;
    for (int64_t c = 0; c < C; c += V) {
      const int64_t k = std::min<int64_t>(V, C - c);
      const Vec xv = k == V ? IO::load(xr + c) : IO::load(xr + c, k);
      const Vec qv = k == V ? TIO::load(qr + c) : TIO::load(qr + c, k);
      const Vec p = exp_shifted(xv, sh);  // degree 6: each p is a value of its own
      Vec t = at::vec::fmadd(K, qv, E);
      if (cw) t = t * (k == V ? Vec::loadu(cw + c) : Vec::loadu(cw + c, k));
      IO::store(gr + c, at::vec::fmsub(A, p, t), k);
    }
  }

  void backward_pixels(int64_t n, int64_t p, int64_t lanes) const {
    const acc_t* stats = static_cast<const acc_t*>(a.stats);
    const int64_t r0 = n * P + p;
    alignas(64) acc_t hi[V] = {}, ab[V] = {}, kb[V] = {}, eb[V] = {};
    for (int64_t j = 0; j < lanes; ++j) {
      const int64_t r = r0 + j;
      const acc_t gs = upstream(r);
      hi[j] = stats[r];
      ab[j] = gs * stats[2 * rows + r] * static_cast<acc_t>(std::exp(-static_cast<double>(stats[rows + r])));
      kb[j] = static_cast<acc_t>(gs * keep);
      eb[j] = static_cast<acc_t>(gs * spread);
    }
    const Vec sh = Vec(acc_t(0)) - Vec::loadu(hi), A = Vec::loadu(ab), K = Vec::loadu(kb), E = Vec::loadu(eb);
    const scalar_t* xp = x + n * C * P + p;
    const target_t* qp = q + n * C * P + p;
    scalar_t* gp = static_cast<scalar_t*>(a.grad_input) + n * C * P + p;
    for (int64_t c = 0; c < C; ++c) {
      const Vec xv = lanes == V ? IO::load(xp + c * P) : IO::load(xp + c * P, lanes);
      const Vec qv = lanes == V ? TIO::load(qp + c * P) : TIO::load(qp + c * P, lanes);
      const Vec pv = exp_shifted(xv, sh);
      const Vec t = at::vec::fmadd(K, qv, E) * Vec(cw ? cw[c] : acc_t(1));
      IO::store(gp + c * P, at::vec::fmsub(A, pv, t), lanes);
    }
  }
};

template <typename scalar_t>
void ce_prob_forward_chunk(const CeProbArgs& args, int64_t chunk, CePartial* out) {
  if constexpr (std::is_same_v<acc_type_t<scalar_t>, float> && !std::is_same_v<scalar_t, float>) {
    if (args.target_float) return CeProb<scalar_t, float>(args).forward_chunk(chunk, out);
  }
  CeProb<scalar_t>(args).forward_chunk(chunk, out);
}

template <typename scalar_t>
void ce_prob_backward_chunk(const CeProbArgs& args, int64_t chunk) {
  if constexpr (std::is_same_v<acc_type_t<scalar_t>, float> && !std::is_same_v<scalar_t, float>) {
    if (args.target_float) return CeProb<scalar_t, float>(args).backward_chunk(chunk);
  }
  CeProb<scalar_t>(args).backward_chunk(chunk);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_wloss
