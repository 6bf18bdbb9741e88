// Shared math of the fused_wloss kernels: per-element losses and gradient coefficients, the
// dynamic weight schemes, and the online-softmax combine step. Plain inline functions on scalars,
// compiled for the host by the CPU kernels and for the device by the CUDA kernels, so that the
// CPU tests exercise the formulas the GPU runs.
//
// The formulas are those of fused_wloss/reference.py (its module docstring states them).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FWL_HD __host__ __device__ __forceinline__
#else
#define FWL_HD inline
#endif

namespace fused_wloss {

// Reductions, in the order of the schema's `reduction` integer (see fused_wloss/ops.py).
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2, kSampleMean = 3 };

// Dynamic weight schemes; kNoScheme means no dynamic weighting. Codes match
// fused_wloss/_weighting.py SCHEME_CODES.
enum WeightScheme : int64_t { kNoScheme = 0, kInverse = 1, kInverseSqrt = 2, kEffectiveNumber = 3 };

// The weight of a class (or label) seen `count` times in the batch.
// inverse: 1 / (n + s); inverse_sqrt: 1 / sqrt(n + s);
// effective_number: (1 - beta) / (1 - beta^max(n, 1)), with 1 - beta^n = -expm1(n log beta).
// In float64 whatever the accumulation type; the caller rounds the weight once. In float32, beta
// itself would round first: 0.9999999 becomes 0.99999988, 1 - beta moves by 19%, and the weight of
// a label seen a few thousand times by 1e-4 (a fresh-seed fuzz run found it).
FWL_HD double scheme_weight(int64_t scheme, double count, double smoothing, double beta) {
  // A count below 0 (BCE or probability targets outside [0, 1] can sum to one) counts as 0, so
  // that 1 / (count + smoothing) stays finite; a NaN count stays NaN.
  if (count < 0.0) count = 0.0;
  switch (scheme) {
    case kInverse:
      return 1.0 / (count + smoothing);
    case kInverseSqrt:
      return 1.0 / std::sqrt(count + smoothing);
    case kEffectiveNumber: {
      const double n = count < 1.0 ? 1.0 : count;
      const double log_beta = beta > 0.0 ? std::log(beta) : -std::numeric_limits<double>::infinity();
      return (1.0 - beta) / -std::expm1(n * log_beta);
    }
    default:
      return 1.0;
  }
}

// Online softmax: the running state of a max `m` and a sum `s` of exp(x - m). Combining two
// partial states is associative, so any split of a row (vector lanes, threads, blocks) reduces to
// the same log-sum-exp up to rounding.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
FWL_HD SoftmaxState<acc_t> online_softmax_combine(SoftmaxState<acc_t> a, SoftmaxState<acc_t> b) {
  if (a.max < b.max) {
    const SoftmaxState<acc_t> t = a;
    a = b;
    b = t;
  }
  // a.max >= b.max; an empty state has max = -inf and sum = 0
  if (b.sum == acc_t(0)) return a;
  return {a.max, a.sum + b.sum * std::exp(b.max - a.max)};
}

template <typename acc_t>
FWL_HD acc_t log_sum_exp(SoftmaxState<acc_t> s) {
  return s.max + std::log(s.sum);
}

// The online-softmax state of a row (or part of one) together with the label-smoothing sums:
// `max`, `sum` of exp(x - max), `wdiff` = sum_c W_c (x_c - max) and `wsum` = sum_c W_c over the
// classes seen (the last two only when label smoothing is on; 0 otherwise). Used by kernels that
// split a row over threads: each part keeps its own state and the states combine in any tree.
template <typename acc_t>
struct RowStats {
  acc_t max, sum, wdiff, wsum;
  static FWL_HD RowStats empty() {
    return {-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0), acc_t(0)};
  }
};

// `s` referred to a new maximum `m` >= s.max (m finite or +inf).
template <typename acc_t>
FWL_HD RowStats<acc_t> row_stats_rebase(RowStats<acc_t> s, acc_t m) {
  if (s.max == m) return s;
  const acc_t d = s.max - m;  // <= 0; -inf for an empty state
  s.sum = s.sum == acc_t(0) ? acc_t(0) : s.sum * std::exp(d);
  if (s.wsum != acc_t(0)) s.wdiff += s.wsum * d;
  s.max = m;
  return s;
}

// Commutative: combine(a, b) and combine(b, a) are bitwise equal.
template <typename acc_t>
FWL_HD RowStats<acc_t> row_stats_combine(RowStats<acc_t> a, RowStats<acc_t> b) {
  const acc_t m = a.max > b.max ? a.max : b.max;  // a NaN max is never formed (see the kernels)
  if (m == -std::numeric_limits<acc_t>::infinity()) {
    return {m, a.sum + b.sum, a.wdiff + b.wdiff, a.wsum + b.wsum};
  }
  a = row_stats_rebase(a, m);
  b = row_stats_rebase(b, m);
  return {m, a.sum + b.sum, a.wdiff + b.wdiff, a.wsum + b.wsum};
}

// A row's log-sum-exp lse = max + log_sum as the forward saves it for the backward: two acc_t
// values with lse = hi + lo, hi the lse rounded to acc_t and lo the rest, formed in float64 as
// (max - hi) + log_sum. lo is tiny for ordinary logits, so rounding it to acc_t costs nothing, and
// where max is so large that max + log_sum rounds to max (|max| > ~1e15 in float64) hi is max and
// lo is log_sum: the backward's p = exp(x - hi) exp(-lo) never loses log_sum.
template <typename acc_t>
struct LseParts {
  acc_t hi, lo;
};

template <typename acc_t>
FWL_HD LseParts<acc_t> split_lse(double max, double log_sum) {
  const acc_t hi = static_cast<acc_t>(max + log_sum);
  return {hi, static_cast<acc_t>((max - static_cast<double>(hi)) + log_sum)};
}

// Softmax cross-entropy of one element with index target t:
//   (1 - eps) W_t (lse - x_t) + eps / C sum_c W_c (lse - x_c)
// from `nll` = lse - x_t and `smooth` = sum_c W_c (lse - x_c), each formed by the caller from
// differences to the row maximum (lse - x = (m - x) + log s), never as a difference of two
// large numbers. `w_t` is W[t] (1 without class weights). The caller scales by the element's
// weight (sample weight, 0 if ignored).
template <typename acc_t>
FWL_HD acc_t ce_index_loss(acc_t nll, acc_t smooth, acc_t w_t, acc_t eps, acc_t num_classes) {
  acc_t loss = (acc_t(1) - eps) * w_t * nll;
  if (eps > acc_t(0)) loss += eps / num_classes * smooth;
  return loss;
}

// Gradient of an index-target element with respect to its logits, as three coefficients:
//   d loss / d x_c = a * p_c - b * [c == t] - e * W_c,   p_c = exp(x_c - lse)
// where `scale` is the upstream gradient times the element's weight (0 if ignored).
template <typename acc_t>
struct CeGradCoeffs {
  acc_t a, b, e;
};

template <typename acc_t>
FWL_HD CeGradCoeffs<acc_t> ce_index_grad_coeffs(acc_t scale, acc_t w_t, acc_t sum_w, acc_t eps,
                                                acc_t num_classes) {
  const acc_t smooth = eps / num_classes;
  return {scale * ((acc_t(1) - eps) * w_t + smooth * sum_w), scale * (acc_t(1) - eps) * w_t,
          scale * smooth};
}

// The true-class gradient, a * p_t - b - e * W_t, computed in acc_t (float32 at least) so that
// p_t - 1 does not cancel in low precision.
template <typename acc_t>
FWL_HD acc_t ce_true_class_grad(CeGradCoeffs<acc_t> k, acc_t p_t, acc_t w_t) {
  return k.a * p_t - k.b - k.e * w_t;
}

// Focal loss (Lin et al., 2017) for softmax cross-entropy with an index target: the element loss
// nll = -log p_t becomes (1 - p_t)^gamma * nll, with 1 - p_t = -expm1(-nll) (no cancellation when
// p_t is near 1). gamma = 0 gives nll back.
template <typename acc_t>
FWL_HD acc_t focal_ce_loss(acc_t nll, acc_t gamma) {
  if (gamma == acc_t(0)) return nll;
  const acc_t u = -std::expm1(-nll);
  return std::pow(u, gamma) * nll;
}

// The factor G of its gradient, d loss / d x_c = G (p_c - [c == t]):
//   G = u^gamma + gamma p_t u^(gamma - 1) nll,  u = 1 - p_t,
// which is 1 for gamma = 0 and tends to 0 as u -> 0 for gamma > 0.
template <typename acc_t>
FWL_HD acc_t focal_ce_grad_factor(acc_t nll, acc_t gamma) {
  if (gamma == acc_t(0)) return acc_t(1);
  const acc_t u = -std::expm1(-nll);
  if (!(u > acc_t(0))) return acc_t(0);  // p_t == 1 (and NaN stays out of the gradient)
  const acc_t p_t = std::exp(-nll);
  if (p_t == acc_t(0)) return std::pow(u, gamma);  // nll = inf: the second term is 0 * inf
  return std::pow(u, gamma) + gamma * p_t * std::pow(u, gamma - acc_t(1)) * nll;
}

// Sigmoid binary cross-entropy of one element:
//   neg (1 - t) softplus(x) + pos t softplus(-x),
// softplus(x) = max(x, 0) + l and softplus(-x) = max(-x, 0) + l from one l = log1p(exp(-|x|)).
// Each part is formed on its own: the shorter n x + (n + pos t) softplus(-x) cancels two products
// of size n |x| for a negative x, and under a large weight n the rounding of one of them is the
// whole result (logit -1e5, target 0, weight 1000 gave 1.9 for a loss of 0).
// `neg` and `pos` are the weights of the negative and positive part (pos includes pos_weight).
// At x = -inf alone the shorter form is kept: its -inf + inf there gives NaN and +inf exactly where
// torch's loss has them (NaN for t <= 1, +inf for t > 1).
template <typename acc_t>
FWL_HD acc_t bce_loss_of(acc_t x, acc_t e, acc_t t, acc_t neg, acc_t pos) {  // e = exp(-|x|)
  const acc_t l = std::log1p(e);
  const acc_t sp_pos = (x > acc_t(0) ? x : acc_t(0)) + l;   // softplus(x)
  const acc_t sp_neg = (x < acc_t(0) ? -x : acc_t(0)) + l;  // softplus(-x)
  const acc_t n = neg * (acc_t(1) - t);
  if (x == -std::numeric_limits<acc_t>::infinity()) return n * x + (n + pos * t) * sp_neg;
  return n * sp_pos + pos * t * sp_neg;
}

template <typename acc_t>
FWL_HD acc_t bce_loss(acc_t x, acc_t t, acc_t neg, acc_t pos) {
  return bce_loss_of(x, std::exp(-std::fabs(x)), t, neg, pos);
}

// sigmoid(x) and sigmoid(-x) = 1 - sigmoid(x) from e = exp(-|x|), each exact in its tail, with one
// division.
template <typename acc_t>
FWL_HD void sigmoid_pair_of(acc_t x, acc_t e, acc_t* sig, acc_t* sig_neg) {
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  *sig = x >= acc_t(0) ? inv : e * inv;
  *sig_neg = x >= acc_t(0) ? e * inv : inv;
}

template <typename acc_t>
FWL_HD void sigmoid_pair(acc_t x, acc_t* sig, acc_t* sig_neg) {
  sigmoid_pair_of(x, std::exp(-std::fabs(x)), sig, sig_neg);
}

// d/dx of bce_loss: neg (1 - t) sigmoid(x) - pos t (1 - sigmoid(x)), from one exp and one division.
template <typename acc_t>
FWL_HD acc_t bce_grad_of(acc_t x, acc_t e, acc_t t, acc_t neg, acc_t pos) {
  acc_t sig, sig_neg;
  sigmoid_pair_of(x, e, &sig, &sig_neg);
  return neg * (acc_t(1) - t) * sig - pos * t * sig_neg;
}

template <typename acc_t>
FWL_HD acc_t bce_grad(acc_t x, acc_t t, acc_t neg, acc_t pos) {
  return bce_grad_of(x, std::exp(-std::fabs(x)), t, neg, pos);
}

// Sigmoid focal loss as torchvision.ops.sigmoid_focal_loss defines it, with our weights: the
// element loss of bce_loss times alpha_t (1 - p_t)^gamma, where p = sigmoid(x),
// 1 - p_t = p (1 - t) + (1 - p) t and alpha_t = alpha t + (1 - alpha)(1 - t) (1 when alpha < 0).
template <typename acc_t>
FWL_HD acc_t focal_alpha_t(acc_t t, acc_t alpha) {
  return alpha < acc_t(0) ? acc_t(1) : alpha * t + (acc_t(1) - alpha) * (acc_t(1) - t);
}

template <typename acc_t>
FWL_HD acc_t bce_focal_loss(acc_t x, acc_t t, acc_t neg, acc_t pos, acc_t gamma, acc_t alpha) {
  const acc_t e = std::exp(-std::fabs(x));
  acc_t sig, sig_neg;
  sigmoid_pair_of(x, e, &sig, &sig_neg);
  const acc_t q = sig * (acc_t(1) - t) + sig_neg * t;
  const acc_t m = gamma == acc_t(0) ? acc_t(1) : std::pow(q, gamma);
  return focal_alpha_t(t, alpha) * m * bce_loss_of(x, e, t, neg, pos);
}

// d/dx of bce_focal_loss: alpha_t (m' l + m l'), with dq/dx = p (1 - p)(1 - 2t); one exp.
template <typename acc_t>
FWL_HD acc_t bce_focal_grad(acc_t x, acc_t t, acc_t neg, acc_t pos, acc_t gamma, acc_t alpha) {
  const acc_t e = std::exp(-std::fabs(x));
  acc_t sig, sig_neg;
  sigmoid_pair_of(x, e, &sig, &sig_neg);
  const acc_t q = sig * (acc_t(1) - t) + sig_neg * t;
  acc_t m = acc_t(1), dm = acc_t(0);
  if (gamma != acc_t(0)) {
    m = std::pow(q, gamma);
    // q^(gamma-1) p (1 - p) -> 0 as q -> 0 (q = 0 needs p = 0 or p = 1)
    if (q > acc_t(0)) dm = gamma * std::pow(q, gamma - acc_t(1)) * sig * sig_neg * (acc_t(1) - acc_t(2) * t);
  }
  const acc_t l = dm == acc_t(0) ? acc_t(0) : bce_loss_of(x, e, t, neg, pos);
  const acc_t d = neg * (acc_t(1) - t) * sig - pos * t * sig_neg;  // bce_grad_of from the same sigmoids
  return focal_alpha_t(t, alpha) * (dm * l + m * d);
}

// Index math shared by every kernel: a CE input viewed as (N, C, P) with P = d1 * ... * dk.
// Element (n, c, p) lives at n * C * P + c * P + p; row r = n * P + p holds the classes of one
// element of the unreduced loss.
FWL_HD int64_t ce_row_offset(int64_t row, int64_t num_classes, int64_t inner) {
  if (inner == 1) return row * num_classes;  // rows: no 64-bit division
  const int64_t n = row / inner;
  const int64_t p = row - n * inner;
  return n * num_classes * inner + p;
}

// How a kernel splits a contiguous run of `n` elements starting at byte address `addr` for
// vector access of `vec_bytes`: `head` scalar elements up to the first aligned address, `vecs`
// whole vectors, then `tail` scalar elements. If the address is not even a multiple of the
// element size, everything is head.
struct VectorSplit {
  int64_t head, vecs, tail;
};

FWL_HD VectorSplit vector_split(uint64_t addr, int64_t n, int64_t elem_bytes, int64_t vec_bytes) {
  const int64_t per_vec = vec_bytes / elem_bytes;
  const int64_t mis = static_cast<int64_t>(addr % static_cast<uint64_t>(vec_bytes));
  if (mis % elem_bytes != 0) return {n, 0, 0};
  int64_t head = mis == 0 ? 0 : (vec_bytes - mis) / elem_bytes;
  if (head > n) head = n;
  const int64_t vecs = (n - head) / per_vec;
  return {head, vecs, n - head - vecs * per_vec};
}

// Threads that share one row in the GPU's row kernels: a power of two so that about `per_thread`
// vectors of `per_vec` elements fall to each thread, from 1 up to `max_threads`.
FWL_HD int64_t threads_per_row(int64_t num_classes, int64_t per_vec, int64_t per_thread,
                               int64_t max_threads) {
  int64_t t = 1;
  while (t < max_threads && t * per_vec * per_thread < num_classes) t *= 2;
  return t;
}

}  // namespace fused_wloss
