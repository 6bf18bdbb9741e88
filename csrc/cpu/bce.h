// Binary cross-entropy: forward, backward and the label sums of the dynamic weights.
#pragma once

#include <array>
#include <vector>

#include "vec_math.h"

namespace fused_wloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

// Binary cross-entropy, flat over the rows of a chunk:
//   loss = w * (neg (1 - t) softplus(x) + pos t softplus(-x))
//   grad = g * w * (neg (1 - t) sigmoid(x) - pos t sigmoid(-x))

// target_t: scalar_t, or float for float32 targets with float16/bfloat16 logits (BceArgs::target_float).
template <typename scalar_t, typename target_t = scalar_t>
struct Bce {
  using acc_t = acc_type_t<scalar_t>;
  using IO = Io<scalar_t>;
  using TIO = Io<target_t>;
  using Vec = typename IO::Vec;
  static_assert(std::is_same_v<Vec, typename TIO::Vec>, "targets load as the logits' acc_t vectors");
  static constexpr int64_t V = Vec::size();

  const BceArgs& a;
  const scalar_t* x;
  const target_t* t;
  const acc_t* neg_w;
  const acc_t* pos_w;
  const acc_t* elem_w;
  const acc_t* elem_pos_w;
  const acc_t* sw;

  // A flat position is tracked as (row r, label l); a full vector moves it by V = step_rows rows
  // and step_labels labels, with no division in the loop.
  int64_t step_rows, step_labels;
  // For L < V, where a vector spans several rows: lane k of a vector that starts at label l lies
  // row_of[l * V + k] rows further on (the sample weights' rows).
  std::array<int8_t, V * V> row_of{};

  explicit Bce(const BceArgs& args)
      : a(args),
        x(static_cast<const scalar_t*>(args.input)),
        t(static_cast<const target_t*>(args.target)),
        neg_w(static_cast<const acc_t*>(args.neg_label_w)),
        pos_w(static_cast<const acc_t*>(args.pos_label_w)),
        elem_w(static_cast<const acc_t*>(args.elem_w)),
        elem_pos_w(static_cast<const acc_t*>(args.elem_pos_w)),
        sw(static_cast<const acc_t*>(args.sample_w)),
        step_rows(V / args.L),
        step_labels(V % args.L) {
    if (sw && a.L < V) {
      for (int64_t l = 0; l < a.L; ++l)
        for (int64_t k = 0; k < V; ++k) row_of[l * V + k] = static_cast<int8_t>((l + k) / a.L);
    }
  }

  static Vec load_acc(const acc_t* p, int64_t n) {
    return n == V ? Vec::loadu(p) : Vec::loadu(p, n);
  }

  // The sample weights of the n elements from row r, label l: two rows at most for L >= V (lanes
  // from L - l on are in row r + 1), else a table of the lanes' rows.
  Vec sample_weights(int64_t r, int64_t l, int64_t n) const {
    if (a.L >= V) {
      const Vec here(sw[r]);
      if (l + n <= a.L) return here;
      return Vec::blendv(here, Vec(sw[r + 1]), Vec::arange(acc_t(0), acc_t(1)) >= Vec(static_cast<acc_t>(a.L - l)));
    }
    alignas(64) acc_t buf[V] = {};
    const int8_t* rows = row_of.data() + l * V;
    for (int64_t k = 0; k < n; ++k) buf[k] = sw[r + rows[k]];
    return Vec::loadu(buf);
  }

  // The weights of `n` elements starting at flat index i, in row r from label l on.
  void weights(int64_t i, int64_t r, int64_t l, int64_t n, Vec* neg, Vec* pos, Vec* w) const {
    *neg = neg_w ? load_acc(neg_w + l, n) : Vec(acc_t(1));
    *pos = pos_w ? load_acc(pos_w + l, n) : Vec(acc_t(1));
    if (elem_pos_w) *pos = *pos * load_acc(elem_pos_w + i, n);
    *w = elem_w ? load_acc(elem_w + i, n) : Vec(acc_t(1));
    if (sw) *w = *w * sample_weights(r, l, n);
  }

  // Moves (row r, label l) on by n elements: for a full vector by the precomputed steps and at most
  // one carry; a partial one (a chunk's first or last) divides.
  void advance(int64_t* r, int64_t* l, int64_t n) const {
    if (n == V) {
      *r += step_rows;
      *l += step_labels;
      if (*l >= a.L) {
        *l -= a.L;
        *r += 1;
      }
      return;
    }
    *l += n;
    *r += *l / a.L;
    *l %= a.L;
  }

  // log1p(exp(-|x|)), the part softplus(x) and softplus(-x) share (softplus(+-x) = max(+-x, 0) +
  // it). In float, log1p(e) for e = exp(-|x|) in (0, 1]
  // is 2 atanh(s) = 2 s + 2 s z Q(z) with s = e / (2 + e) <= 1/3 and z = s^2 <= 1/9: Q a cubic
  // fit of (atanh(s) / s - 1) / z (relative error 4e-9), no log call and no cancellation as e -> 0;
  // 2 ulp at worst. float64 keeps log(u) * e / (u - 1), u = 1 + e (exact where u rounds to 1).
  static Vec exp_neg_abs(const Vec& v) {
    const Vec neg_abs = v | Vec(acc_t(-0.0));  // -|x|: the sign bit set
    if constexpr (std::is_same_v<acc_t, float>) {
      return exp2_nonpositive(neg_abs * Vec(static_cast<acc_t>(kLog2e)));
    } else {
      return neg_abs.exp();
    }
  }

  static Vec log1p_exp_neg_abs(const Vec& v) { return log1p_of(exp_neg_abs(v)); }

  // log1p(e) for e = exp(-|x|) in (0, 1], as above
  static Vec log1p_of(const Vec& e) {
    const Vec zero(acc_t(0)), one(acc_t(1));
    Vec log1p_e;
    if constexpr (std::is_same_v<acc_t, float>) {
      const Vec s = e * reciprocal(Vec(2.0f) + e);
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
    return log1p_e;
  }

  // The plain element loss nt softplus(x) + pt softplus(-x) (nt = neg (1 - t), pt = pos t) from
  // l = log1p(exp(-|x|)): with softplus(+-x) = max(+-x, 0) + l it is (nt + pt) l + nt x for x >= 0
  // and (nt + pt) l - pt x below, two terms of one sign for targets in [0, 1] and weights >= 0, so
  // no cancellation. At x = -inf alone bce_loss's shorter form nt x + (nt + pt) softplus(-x), for
  // torch's NaN and +inf there: a lane test that a finite batch never takes.
  static Vec plain_loss(const Vec& vx, const Vec& l, const Vec& nt, const Vec& pt) {
    const Vec zero(acc_t(0));
    const Vec slope = select_nonneg(vx, nt, zero - pt);
    const Vec loss = at::vec::fmadd(nt + pt, l, slope * vx);
    if (C10_LIKELY(!any_neg_inf(vx))) return loss;
    const Vec neg_inf = vx == Vec(-std::numeric_limits<acc_t>::infinity());
    const Vec sp_neg = at::vec::maximum(zero - vx, zero) + l;
    return Vec::blendv(loss, at::vec::fmadd(nt + pt, sp_neg, nt * vx), neg_inf);
  }

  // sigmoid(x) and sigmoid(-x) from e = exp(-|x|), exact in both tails
  static void sigmoids(const Vec& vx, const Vec& e, Vec* sig, Vec* sig_neg) {
    const Vec one(acc_t(1));
    const Vec inv = reciprocal(one + e);
    const Vec e_inv = e * inv;
    *sig = select_nonneg(vx, inv, e_inv);
    *sig_neg = select_nonneg(vx, e_inv, inv);
  }

  // The sigmoid focal loss (bce_focal_loss in fused_wloss_math.h): gamma != 0 or alpha >= 0.
  bool focal() const { return a.gamma != 0.0 || a.alpha >= 0.0; }

  // Its factors, vectorised: m = alpha_t (1 - p_t)^gamma and (with_grad) dm = alpha_t d/dx of
  // (1 - p_t)^gamma = alpha_t gamma q^(gamma - 1) p (1 - p) (1 - 2t), 0 where q = 1 - p_t <= 0;
  // q = p (1 - t) + (1 - p) t with 1 - p as sigmoid(-x).
  void focal_factors(const Vec& vt, const Vec& sig, const Vec& sig_neg, bool with_grad, Vec* m, Vec* dm) const {
    const Vec one(acc_t(1)), zero(acc_t(0));
    *m = one;
    *dm = zero;
    if (a.gamma != 0.0) {
      const Vec gamma(static_cast<acc_t>(a.gamma));
      const Vec q = at::vec::fmadd(sig, one - vt, sig_neg * vt);
      // q^gamma and q^(gamma - 1): products for the usual gamma = 2 and 1, else one pow and a
      // quotient (q^(gamma - 1) is needed only where q > 0)
      Vec q_g1;
      if (a.gamma == 2.0) {
        *m = q * q;
        q_g1 = q;
      } else if (a.gamma == 1.0) {
        *m = q;
        q_g1 = one;
      } else {
        *m = q.pow(gamma);
        q_g1 = *m / q;
      }
      if (with_grad) {
        const Vec d = gamma * q_g1 * sig * sig_neg * (one - (vt + vt));
        *dm = Vec::blendv(zero, d, q > zero);
      }
    }
    if (a.alpha >= 0.0) {
      const Vec alpha(static_cast<acc_t>(a.alpha));
      const Vec alpha_t = at::vec::fmadd(alpha, vt, (one - alpha) * (one - vt));
      *m = *m * alpha_t;
      *dm = *dm * alpha_t;
    }
  }

  // n losses from flat index i into the "none" output: the input's dtype, or acc_t under autocast
  // (loss_out_acc)
  void put_losses(int64_t i, const Vec& loss, int64_t n) const {
    if (a.loss_out_acc) {
      acc_t* out = static_cast<acc_t*>(a.loss_out) + i;
      if (n == V) {
        loss.store(out);
      } else {
        loss.store(out, n);
      }
    } else {
      IO::store(static_cast<scalar_t*>(a.loss_out) + i, loss, n);
    }
  }

  double forward_chunk(int64_t chunk) const {
    return focal() ? forward_rows<true>(chunk) : forward_rows<false>(chunk);
  }

  template <bool kFocal>
  double forward_rows(int64_t chunk) const {
    const int64_t r0 = chunk * a.rows_per_chunk;
    const int64_t r1 = std::min(a.rows, r0 + a.rows_per_chunk);
    const int64_t begin = r0 * a.L, count = (r1 - r0) * a.L;
    const bool out = a.loss_out != nullptr;
    const Vec one(acc_t(1)), zero(acc_t(0));
    double total = 0;
    Vec block(acc_t(0));
    int64_t in_block = 0;
    for (int64_t j = 0, r = r0, l = 0; j < count; j += V, advance(&r, &l, V)) {  // a chunk starts a row
      const int64_t n = std::min<int64_t>(V, count - j);
      const int64_t i = begin + j;
      const Vec vx = n == V ? IO::load(x + i) : IO::load(x + i, n);
      const Vec vt = n == V ? TIO::load(t + i) : TIO::load(t + i, n);
      Vec neg, pos, w;
      weights(i, r, l, n, &neg, &pos, &w);
      const Vec e = exp_neg_abs(vx);
      Vec loss = w * plain_loss(vx, log1p_of(e), neg * (one - vt), pos * vt);
      if constexpr (kFocal) {
        Vec sig, sig_neg, m, dm;
        sigmoids(vx, e, &sig, &sig_neg);
        focal_factors(vt, sig, sig_neg, false, &m, &dm);
        loss = loss * m;
      }
      if (n < V) loss = Vec::set(zero, loss, n);
      if (out) put_losses(i, loss, n);
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
    if (focal()) {
      backward_rows<true>(chunk);
    } else {
      backward_rows<false>(chunk);
    }
  }

  template <bool kFocal>
  void backward_rows(int64_t chunk) const {
    const int64_t r0 = chunk * a.rows_per_chunk;
    const int64_t r1 = std::min(a.rows, r0 + a.rows_per_chunk);
    const int64_t begin = r0 * a.L, count = (r1 - r0) * a.L;
    const acc_t* ge = static_cast<const acc_t*>(a.grad_elems);
    scalar_t* gx = static_cast<scalar_t*>(a.grad_input);
    const Vec one(acc_t(1)), zero(acc_t(0)), gs(static_cast<acc_t>(a.grad_scalar));
    bool stream = false;
    int64_t head = 0;  // elements before the first vector-aligned gradient address
    if constexpr (kStreamable<scalar_t>) {
      stream = a.streaming_stores;
      if (stream) head = vector_split(reinterpret_cast<uintptr_t>(gx + begin), count, sizeof(float), V * sizeof(float)).head;
    }
    for (int64_t j = 0, n = 0, r = r0, l = 0; j < count; j += n, advance(&r, &l, n)) {
      n = j == 0 && head > 0 ? head : std::min<int64_t>(V, count - j);
      const int64_t i = begin + j;
      const Vec vx = n == V ? IO::load(x + i) : IO::load(x + i, n);
      const Vec vt = n == V ? TIO::load(t + i) : TIO::load(t + i, n);
      Vec neg, pos, w;
      weights(i, r, l, n, &neg, &pos, &w);
      const Vec e = exp_neg_abs(vx);
      Vec sig, sig_neg;
      sigmoids(vx, e, &sig, &sig_neg);
      const Vec g = ge ? load_acc(ge + i, n) : gs;
      const Vec nt = neg * (one - vt), pt = pos * vt;
      Vec d = nt * sig - pt * sig_neg;  // d loss / dx of the plain element loss
      if constexpr (kFocal) {
        // (m l)' = dm l + m l', with l the plain element loss (its 0 * inf where dm = 0 is 0)
        Vec m, dm;
        focal_factors(vt, sig, sig_neg, true, &m, &dm);
        const Vec dml = dm * plain_loss(vx, log1p_of(e), nt, pt);
        d = at::vec::fmadd(m, d, Vec::blendv(dml, zero, dm == zero));
      }
      const Vec grad = g * w * d;
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
  if constexpr (std::is_same_v<acc_type_t<scalar_t>, float> && !std::is_same_v<scalar_t, float>) {
    if (args.target_float) return Bce<scalar_t, float>(args).forward_chunk(chunk);
  }
  return Bce<scalar_t>(args).forward_chunk(chunk);
}

template <typename scalar_t>
void bce_backward_chunk(const BceArgs& args, int64_t chunk) {
  if constexpr (std::is_same_v<acc_type_t<scalar_t>, float> && !std::is_same_v<scalar_t, float>) {
    if (args.target_float) return Bce<scalar_t, float>(args).backward_chunk(chunk);
  }
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_wloss
