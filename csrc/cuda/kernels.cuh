// CUDA kernels of fused_wloss. The host code that sizes and launches them is losses_host.h; the
// per-element formulas come from fused_wloss_math.h, shared with the CPU kernels.
//
// Cross-entropy, input viewed as (N, C, P) with row r = n * P + p:
// - ce_forward_kernel / ce_backward_kernel with kBlockPerRow = false: a group of `group` lanes
//   (a power of two up to 32) per row, blockDim / group rows per block, for C up to a few
//   thousand; for K-dim inputs (P > 1) with fewer than 32 pixels an image, or with few pixels of
//   many classes (sliced), one thread per pixel, walking the classes with stride P, so that a warp
//   reads 32 neighbouring pixels of one class at a time.
// - K-dim inputs otherwise: ce_forward_pixels_kernel / ce_backward_pixels_kernel on a grid of
//   (pixel blocks, images), a pixel or a 16-byte vector of pixels a thread, no division.
// - the same kernels with kBlockPerRow = true: one block per row, for large C; for few rows of
//   many classes a row is cut into slices, a block each (ce_forward_slice_kernel writes each
//   slice's state, ce_forward_combine_kernel combines a row's states in slice order; the backward
//   needs no reduction, so its blocks simply take a slice each).
// Rows are read with 16-byte vector loads after a scalar head up to the first aligned address,
// and a scalar tail. The forward keeps one online-softmax state per thread (RowStats), combines
// the states of a row by shuffles (and shared memory across warps), writes the row's
// log-sum-exp (float64) and loss, and each block writes one partial sum of its rows; the
// finalize kernel adds the partials in a fixed order, so a reduced loss is bitwise repeatable.
// The backward reads the logits once and writes the gradient once.
//
// Counting: class_count_kernel histograms the targets (integer atomics, exact in any order);
// class_weight_kernel forms the weights and their sum in one block.
//
// Probability targets: see the section below.
//
// Binary cross-entropy: flat over the elements, a 16-byte vector of logits per thread and step
// where every operand is aligned, the (row, label) of each element carried along without a
// division; the forward's blocks each a fixed range with one partial sum, reduced in order as
// above. bce_label_sum_kernel + bce_label_weight_kernel form the dynamic per-label weights from
// the target sums over a fixed cut of the rows.
#pragma once

#include "device.cuh"

namespace fused_wloss {
namespace cuda {

// One block's share of a reduced cross-entropy.
struct CePartialSums {
  double loss_sum;
  double weight_sum;
  long long valid;
  long long pad;
};

template <typename scalar_t>
struct CeKernelArgs {
  using acc_t = acc_t_of<scalar_t>;
  const scalar_t* x;
  const void* target;
  bool target_int32;
  const acc_t* class_w;   // [C] static x dynamic, or nullptr
  const acc_t* sum_w;     // device scalar sum_c class_w[c], or nullptr (then C)
  const acc_t* sample_w;  // [rows] or nullptr
  int64_t rows, C, P;
  int64_t N;              // rows / P
  int64_t ignore_index;
  double eps;             // label smoothing
  double gamma;           // focal-loss focusing, 0 for plain cross-entropy
  int group;              // lanes per row (kBlockPerRow = false, P == 1)
  int slices;             // blocks per row (kBlockPerRow, P == 1): 1, or a split row (ce_slice_of)
  RowStats<acc_t_of<scalar_t>>* slice_stats;  // split forward: [rows * slices] states, then combined
  // forward
  acc_t* lse;               // [2, rows]: each row's lse as hi, then lo (split_lse)
  scalar_t* loss_rows;      // [rows] for reduction "none", else nullptr
  acc_t* loss_rows_acc;     // instead of loss_rows when the loss is asked for in acc_t (autocast)
  CePartialSums* partials;  // one per block of the forward, or nullptr for reduction "none" (no finalize kernel)
  acc_t* norm_one;          // "none": the normaliser to set to 1 (in place of the finalize kernel)
  // backward
  const acc_t* grad_out;     // [rows] for "none", else [1]
  const acc_t* norm;         // device normaliser of "mean"/"sample_mean", else nullptr
  int reduction;
  scalar_t* grad_x;
};

constexpr int kRowsBlock = 256;  // threads of the grouped kernels
// The most threads a block of the cross-entropy kernels has (a block per row): their
// __launch_bounds__, so that ptxas keeps the registers a thread uses within what such a block can
// have, and the bound the launch configuration (ce_launch) stays under.
constexpr int kMaxRowBlock = 512;
constexpr int kClassWeightThreads = 1024;  // class_weight_kernel's single block

__device__ __forceinline__ int64_t load_target(const void* t, bool is_int32, int64_t row) {
  return is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(t)[row])
                  : static_cast<const int64_t*>(t)[row];
}

// Adds n values (classes c0 .. c0+n-1 of a row) to a thread's state: one rescale per call,
// then one exponential per value.
template <typename acc_t>
__device__ __forceinline__ void stats_add(RowStats<acc_t>& st, const acc_t* v, int n, int64_t c0,
                                          const acc_t* class_w, bool smooth) {
  acc_t cm = -std::numeric_limits<acc_t>::infinity();
  for (int k = 0; k < n; ++k) cm = v[k] > cm ? v[k] : cm;  // NaN never wins; it shows in the sum
  const acc_t m = st.max > cm ? st.max : cm;
  if (m == -std::numeric_limits<acc_t>::infinity()) {  // nothing but -inf (or NaN) so far
    for (int k = 0; k < n; ++k) {
      if (v[k] != v[k]) st.sum = v[k];  // a NaN logit makes the row NaN, as in torch
      if (smooth) st.wsum += class_w ? class_w[c0 + k] : acc_t(1);
    }
    return;
  }
  st = row_stats_rebase(st, m);
  for (int k = 0; k < n; ++k) {
    const acc_t d = v[k] - m;
    st.sum += exp_acc(d);
    if (smooth) {
      const acc_t w = class_w ? class_w[c0 + k] : acc_t(1);
      st.wdiff += w * d;
      st.wsum += w;
    }
  }
}

// The part of a contiguous row that one of `slices` blocks takes: the row's aligned vectors cut
// evenly (in whole vectors), the scalar head with the first slice and the tail with the last.
struct RowSlice {
  VectorSplit sp;
  int64_t head, vec_begin, vec_end, tail;  // head and tail elements of this slice; its vectors
};

__device__ __forceinline__ RowSlice ce_slice_of(uint64_t row_addr, int64_t C, int64_t elem_bytes, int slice,
                                                int slices) {
  RowSlice r;
  r.sp = vector_split(row_addr, C, elem_bytes, 16);
  const int64_t per = (r.sp.vecs + slices - 1) / slices;
  r.vec_begin = per * slice < r.sp.vecs ? per * slice : r.sp.vecs;
  r.vec_end = r.vec_begin + per < r.sp.vecs ? r.vec_begin + per : r.sp.vecs;
  r.head = slice == 0 ? r.sp.head : 0;
  r.tail = slice == slices - 1 ? r.sp.tail : 0;
  return r;
}

// The state of the classes of (a slice of) one contiguous row that fall to `lane` of `group`.
template <typename scalar_t>
__device__ __forceinline__ RowStats<acc_t_of<scalar_t>> ce_row_stats_contiguous(
    const CeKernelArgs<scalar_t>& a, int64_t row, int lane, int group, int slice = 0, int slices = 1) {
  using acc_t = acc_t_of<scalar_t>;
  constexpr int K = Pack<scalar_t>::kSize;
  const bool smooth = a.eps > 0.0;
  const scalar_t* xr = a.x + row * a.C;
  const RowSlice rs = ce_slice_of(reinterpret_cast<uint64_t>(xr), a.C, sizeof(scalar_t), slice, slices);
  const VectorSplit& sp = rs.sp;
  RowStats<acc_t> st = RowStats<acc_t>::empty();
  for (int64_t i = lane; i < rs.head; i += group) {
    const acc_t v = to_acc(xr[i]);
    stats_add(st, &v, 1, i, a.class_w, smooth);
  }
  const scalar_t* body = xr + sp.head;
  auto add_pack = [&](const Pack<scalar_t>& p, int64_t j) {
    acc_t v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = to_acc(p.v[k]);
    stats_add(st, v, K, sp.head + j * K, a.class_w, smooth);
  };
  int64_t j = rs.vec_begin + lane;
  for (; j + group < rs.vec_end; j += 2 * group) {  // two 16-byte loads in flight, added in order
    const Pack<scalar_t> p0 = load_pack(body + j * K);
    const Pack<scalar_t> p1 = load_pack(body + (j + group) * K);
    add_pack(p0, j);
    add_pack(p1, j + group);
  }
  if (j < rs.vec_end) add_pack(load_pack(body + j * K), j);
  const int64_t t0 = sp.head + sp.vecs * K;
  for (int64_t i = lane; i < rs.tail; i += group) {
    const acc_t v = to_acc(xr[t0 + i]);
    stats_add(st, &v, 1, t0 + i, a.class_w, smooth);
  }
  return st;
}

// The classes [begin, end) that slice `slice` of `slices` of a K-dim pixel takes.
__device__ __forceinline__ void ce_class_range(int64_t C, int slice, int slices, int64_t* begin, int64_t* end) {
  const int64_t per = (C + slices - 1) / slices;
  *begin = per * slice < C ? per * slice : C;
  *end = *begin + per < C ? *begin + per : C;
}

// The state of one K-dim row (pixel) over classes [c_begin, c_end): classes at stride P, four at a
// time.
template <typename scalar_t>
__device__ __forceinline__ RowStats<acc_t_of<scalar_t>> ce_row_stats_strided(
    const CeKernelArgs<scalar_t>& a, int64_t row, int64_t c_begin, int64_t c_end) {
  using acc_t = acc_t_of<scalar_t>;
  const bool smooth = a.eps > 0.0;
  const scalar_t* xr = a.x + ce_row_offset(row, a.C, a.P);
  RowStats<acc_t> st = RowStats<acc_t>::empty();
  int64_t c = c_begin;
  for (; c + 4 <= c_end; c += 4) {
    acc_t v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = to_acc(xr[(c + k) * a.P]);
    stats_add(st, v, 4, c, a.class_w, smooth);
  }
  for (; c < c_end; ++c) {
    const acc_t v = to_acc(xr[c * a.P]);
    stats_add(st, &v, 1, c, a.class_w, smooth);
  }
  return st;
}

// The per-row epilogue of the forward, on one thread: log-sum-exp, target gather, weights, loss.
// In float64 like the CPU kernels, with every lse - x formed as (m - x) + log s.
// `base`: the offset of the row's first class, ce_row_offset(row, C, P).
template <typename scalar_t>
__device__ __forceinline__ CePartialSums ce_forward_row_epilogue(const CeKernelArgs<scalar_t>& a, int64_t row,
                                                                 int64_t base,
                                                                 const RowStats<acc_t_of<scalar_t>>& st) {
  const double md = static_cast<double>(st.max);
  const double ls = log(static_cast<double>(st.sum));
  const LseParts<acc_t_of<scalar_t>> lse = split_lse<acc_t_of<scalar_t>>(md, ls);
  a.lse[row] = lse.hi;
  a.lse[a.rows + row] = lse.lo;
  CePartialSums out{0.0, 0.0, 0, 0};
  const int64_t t = load_target(a.target, a.target_int32, row);
  if (t != a.ignore_index) {
    FWL_KERNEL_ASSERT(t >= 0 && t < a.C,
                      "fused_wloss.cross_entropy: target out of range: class indices must be in [0, C) or ignore_index");
    const double x_t = static_cast<double>(to_acc(a.x[base + t * a.P]));
    const double w_t = a.class_w ? static_cast<double>(a.class_w[t]) : 1.0;
    const double s = a.sample_w ? static_cast<double>(a.sample_w[row]) : 1.0;
    const double nll = (md - x_t) + ls;
    const double smooth_sum =
        a.eps > 0.0 ? static_cast<double>(st.wsum) * ls - static_cast<double>(st.wdiff) : 0.0;
    out.loss_sum = s * ce_index_loss<double>(focal_ce_loss(nll, a.gamma), smooth_sum, w_t, a.eps,
                                             static_cast<double>(a.C));
    out.weight_sum = s * w_t;
    out.valid = 1;
  }
  if (a.loss_rows_acc) {
    a.loss_rows_acc[row] = static_cast<acc_t_of<scalar_t>>(out.loss_sum);
  } else if (a.loss_rows) {
    a.loss_rows[row] = static_cast<scalar_t>(out.loss_sum);
  }
  return out;
}

// The block's partial sums of its rows' results (`mine`: the row a thread finished, zeros for the
// threads without one), reduced in a fixed order (each warp by shuffles, then warp 0 over the warps,
// as block_allreduce_sum) rather than by one thread walking up to 256 rows, and written by thread 0
// (nothing for reduction "none": out == nullptr) to out[index]. Every thread of the block must
// call it.
__device__ __forceinline__ void write_block_partial(const CePartialSums& mine, CePartialSums* out, int64_t index) {
  FWL_SHARED(double, dscratch, kWarpSize);
  FWL_SHARED(long long, iscratch, kWarpSize);
  if (out == nullptr) return;  // uniform over the block
  const double loss_sum = block_allreduce_sum(mine.loss_sum, dscratch);
  const double weight_sum = block_allreduce_sum(mine.weight_sum, dscratch);
  const long long valid = block_allreduce_sum(mine.valid, iscratch);
  if (threadIdx.x == 0) out[index] = CePartialSums{loss_sum, weight_sum, valid, 0};
}

template <typename scalar_t, bool kBlockPerRow>
__global__ void __launch_bounds__(kMaxRowBlock) ce_forward_kernel(CeKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  FWL_SHARED(RowStats<acc_t>, scratch, kWarpSize);
  const int group = kBlockPerRow ? static_cast<int>(blockDim.x) : a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / group;
  const int slot = static_cast<int>(threadIdx.x) / group;
  const int lane = static_cast<int>(threadIdx.x) % group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + slot;
  const bool active = row < a.rows;

  RowStats<acc_t> st = RowStats<acc_t>::empty();
  if (active) st = a.P > 1 ? ce_row_stats_strided(a, row, 0, a.C) : ce_row_stats_contiguous(a, row, lane, group);
  // every thread takes part in the reductions, active or not
  if (kBlockPerRow) {
    st = block_allreduce_stats(st, scratch, a.eps > 0.0);
  } else if (group > 1) {
    st = group_allreduce_stats(st, group, a.eps > 0.0);
  }
  const CePartialSums mine = lane == 0 && active ? ce_forward_row_epilogue(a, row, ce_row_offset(row, a.C, a.P), st)
                                                 : CePartialSums{0.0, 0.0, 0, 0};
  if (a.norm_one != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *a.norm_one = acc_t(1);
  write_block_partial(mine, a.partials, blockIdx.x);
}

// A row split over a.slices blocks (few rows of many classes: every SM gets work): block b takes
// slice b % slices of row b / slices and writes its state; ce_forward_combine_kernel then combines
// each row's states in slice order (the same result on any GPU: the cut depends on the shape only)
// and finishes the row as the one-block-per-row kernel does.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxRowBlock) ce_forward_slice_kernel(CeKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  FWL_SHARED(RowStats<acc_t>, scratch, kWarpSize);
  const int64_t row = static_cast<int64_t>(blockIdx.x) / a.slices;
  const int slice = static_cast<int>(static_cast<int64_t>(blockIdx.x) - row * a.slices);
  RowStats<acc_t> st = ce_row_stats_contiguous(a, row, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
                                               slice, a.slices);
  st = block_allreduce_stats(st, scratch, a.eps > 0.0);
  if (threadIdx.x == 0) a.slice_stats[blockIdx.x] = st;
}

// The same for K-dim inputs with few pixels and many classes ((8, 32000, 512): 16 blocks of a
// thread per pixel): block b takes the pixels of block b / slices and slice b % slices of their
// classes, a state per pixel and slice for ce_forward_combine_kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowsBlock) ce_forward_pixel_slice_kernel(CeKernelArgs<scalar_t> a) {
  const int64_t unit = static_cast<int64_t>(blockIdx.x) / a.slices;
  const int slice = static_cast<int>(static_cast<int64_t>(blockIdx.x) - unit * a.slices);
  const int64_t row = unit * blockDim.x + threadIdx.x;
  if (row >= a.rows) return;
  int64_t c0, c1;
  ce_class_range(a.C, slice, a.slices, &c0, &c1);
  a.slice_stats[row * a.slices + slice] = ce_row_stats_strided(a, row, c0, c1);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowsBlock) ce_forward_combine_kernel(CeKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  CePartialSums out{0.0, 0.0, 0, 0};
  if (row < a.rows) {
    RowStats<acc_t> st = a.slice_stats[row * a.slices];
    for (int k = 1; k < a.slices; ++k) st = row_stats_combine(st, a.slice_stats[row * a.slices + k]);
    out = ce_forward_row_epilogue(a, row, ce_row_offset(row, a.C, a.P), st);
  }
  if (a.norm_one != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *a.norm_one = acc_t(1);
  write_block_partial(out, a.partials, blockIdx.x);
}

// The upstream gradient of one row, divided by the normaliser of a "mean" (NaN for a zero
// normaliser, as torch).
template <typename scalar_t>
__device__ __forceinline__ acc_t_of<scalar_t> ce_upstream_grad(const CeKernelArgs<scalar_t>& a,
                                                               int64_t row) {
  using acc_t = acc_t_of<scalar_t>;
  if (a.reduction == kNone) return to_acc(a.grad_out[row]);
  acc_t g = to_acc(a.grad_out[0]);
  if (a.norm != nullptr) {
    const acc_t n = *a.norm;
    g = n == acc_t(0) ? std::numeric_limits<acc_t>::quiet_NaN() : g / n;
  }
  return g;
}

// What the backward needs of one row: its gradient, grad(v, c) for logit v of class c, is
// a * p_c - b [c == t] - e W_c with p_c = exp(v - lse) (ce_index_grad_coeffs).
template <typename acc_t>
struct CeRowGrad {
  const acc_t* class_w;
  int64_t t;
  bool ignored, with_e;
  acc_t w_t, ref, factor, ka;
  CeGradCoeffs<acc_t> k;

  __device__ __forceinline__ acc_t operator()(acc_t v, int64_t c) const {
    if (ignored) return acc_t(0);
    const acc_t e = exp_acc(v - ref);
    if (c == t) return ce_true_class_grad(k, factor * e, w_t);
    acc_t g = ka * e;
    if (with_e) g -= k.e * (class_w ? class_w[c] : acc_t(1));
    return g;
  }
};

// The backward's per-row prologue: target, weights, upstream gradient (and the focal factor) as the
// coefficients of CeRowGrad. `base`: the offset of the row's first class.
template <typename scalar_t>
__device__ __forceinline__ CeRowGrad<acc_t_of<scalar_t>> ce_row_grad(const CeKernelArgs<scalar_t>& a, int64_t row,
                                                                     int64_t base) {
  using acc_t = acc_t_of<scalar_t>;
  CeRowGrad<acc_t> r;
  r.class_w = a.class_w;
  r.t = load_target(a.target, a.target_int32, row);
  r.ignored = r.t == a.ignore_index;
  if (!r.ignored) {
    FWL_KERNEL_ASSERT(r.t >= 0 && r.t < a.C,
                      "fused_wloss.cross_entropy: target out of range: class indices must be in [0, C) or ignore_index");
  }
  r.w_t = r.ignored ? acc_t(0) : (a.class_w ? a.class_w[r.t] : acc_t(1));
  acc_t scale = r.ignored ? acc_t(0) : ce_upstream_grad(a, row) * (a.sample_w ? a.sample_w[row] : acc_t(1));
  if (a.gamma != 0.0 && !r.ignored) {  // focal loss: d loss / d x_c = G (p_c - [c == t]) times the weights
    const double nll = (static_cast<double>(a.lse[row]) - static_cast<double>(to_acc(a.x[base + r.t * a.P]))) +
                       static_cast<double>(a.lse[a.rows + row]);  // (hi - x_t) + lo
    scale *= static_cast<acc_t>(focal_ce_grad_factor(nll, a.gamma));
  }
  const acc_t sum_w = a.sum_w ? *a.sum_w : static_cast<acc_t>(a.C);
  r.k = ce_index_grad_coeffs<acc_t>(scale, r.w_t, sum_w, static_cast<acc_t>(a.eps), static_cast<acc_t>(a.C));
  // p_c = exp(x_c - lse), lse = hi + lo (split_lse): subtract ref = hi, the lse rounded to acc_t
  // (exact for the x near it), and fold the rest, exp(-lo), into the coefficient of p.
  r.ref = a.lse[row];
  r.factor = static_cast<acc_t>(exp(-static_cast<double>(a.lse[a.rows + row])));
  r.ka = r.k.a * r.factor;
  r.with_e = r.k.e != acc_t(0);
  return r;
}

// The gradient of classes [c0, c1) of V neighbouring pixels (rows g[0 .. V-1]) whose logits start
// at xp and gradient at gp, a class every P elements: four classes' loads in flight before their
// stores. gp may be xp itself (the in-place gradient): every address is read, then written, by
// the one thread.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void ce_grad_pixels(const scalar_t* xp, scalar_t* gp, int64_t P, int64_t c0, int64_t c1,
                                               const CeRowGrad<acc_t>* g) {
  auto grad_store = [&](const PixelVec<V, scalar_t>& v, int64_t c) {
    PixelVec<V, scalar_t> out;
#pragma unroll
    for (int q = 0; q < V; ++q) out.v[q] = static_cast<scalar_t>(g[q](to_acc(v.v[q]), c));
    store_pixels(gp + c * P, out);
  };
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    PixelVec<V, scalar_t> v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = load_pixels<V>(xp + (c + k) * P);
#pragma unroll
    for (int k = 0; k < 4; ++k) grad_store(v[k], c + k);
  }
  for (; c < c1; ++c) grad_store(load_pixels<V>(xp + c * P), c);
}

template <typename scalar_t, bool kBlockPerRow>
__global__ void __launch_bounds__(kMaxRowBlock) ce_backward_kernel(CeKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  constexpr int K = Pack<scalar_t>::kSize;
  const int group = kBlockPerRow ? static_cast<int>(blockDim.x) : a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / group;
  const int lane = static_cast<int>(threadIdx.x) % group;
  // a block may take one of a.slices slices of its rows (the forward's cut): the classes of a row
  // (a block per row) or of a block's pixels (K-dim); 1 for the grouped rows
  const int slices = a.slices;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) / slices;
  const int slice = static_cast<int>(static_cast<int64_t>(blockIdx.x) - unit * slices);
  const int64_t row = unit * rows_per_block + threadIdx.x / group;
  if (row >= a.rows) return;  // no cooperation below

  const int64_t base = ce_row_offset(row, a.C, a.P);
  const scalar_t* xr = a.x + base;
  scalar_t* gr = a.grad_x + base;
  CeRowGrad<acc_t> grad_of;
  if constexpr (kBlockPerRow) {  // the row's prologue once a block (float64 exp, focal, loads), not per thread
    FWL_SHARED(CeRowGrad<acc_t>, block_grad, 1);
    if (threadIdx.x == 0) block_grad[0] = ce_row_grad(a, row, base);
    __syncthreads();  // every thread of the block has this row: none returned above
    grad_of = block_grad[0];
  } else {
    grad_of = ce_row_grad(a, row, base);
  }

  if (a.P > 1) {  // one thread per pixel: classes at stride P
    int64_t c0, c1;
    ce_class_range(a.C, slice, slices, &c0, &c1);
    ce_grad_pixels<1>(xr, gr, a.P, c0, c1, &grad_of);
    return;
  }
  const RowSlice rs = ce_slice_of(reinterpret_cast<uint64_t>(xr), a.C, sizeof(scalar_t), slice, slices);
  const VectorSplit& sp = rs.sp;
  const bool vector_store = reinterpret_cast<uint64_t>(xr) % 16 == reinterpret_cast<uint64_t>(gr) % 16;
  for (int64_t i = lane; i < rs.head; i += group) gr[i] = static_cast<scalar_t>(grad_of(to_acc(xr[i]), i));
  auto grad_pack = [&](const Pack<scalar_t>& p, int64_t c0) {
    Pack<scalar_t> out;
#pragma unroll
    for (int q = 0; q < K; ++q) out.v[q] = static_cast<scalar_t>(grad_of(to_acc(p.v[q]), c0 + q));
    if (vector_store) {
      store_pack(gr + c0, out);
    } else {
      for (int q = 0; q < K; ++q) gr[c0 + q] = out.v[q];
    }
  };
  int64_t j = rs.vec_begin + lane;
  for (; j + group < rs.vec_end; j += 2 * group) {  // two 16-byte loads in flight
    const int64_t c0 = sp.head + j * K, c1 = c0 + group * K;
    const Pack<scalar_t> p0 = load_pack(xr + c0);
    const Pack<scalar_t> p1 = load_pack(xr + c1);
    grad_pack(p0, c0);
    grad_pack(p1, c1);
  }
  if (j < rs.vec_end) grad_pack(load_pack(xr + sp.head + j * K), sp.head + j * K);
  const int64_t t0 = sp.head + sp.vecs * K;
  for (int64_t i = lane; i < rs.tail; i += group) {
    gr[t0 + i] = static_cast<scalar_t>(grad_of(to_acc(xr[t0 + i]), t0 + i));
  }
}

// ---- K-dim inputs on a grid of (pixel blocks, images) ----------------------------------------
// Thread x of block (bx, by) takes the V pixels from (bx * blockDim.x + x) * V of the images by,
// by + gridDim.y, ...: no division by P anywhere (the flat mapping above divides every row index),
// and where V > 1 (P a multiple of V, the logits 16-byte aligned) one 16-byte access covers V
// pixels of a class. ce_launch picks this mapping when the pixels of an image fill a warp's
// worth of threads and the classes are not cut into slices.

// The states of V neighbouring pixels whose logits start at xp, over all classes, four classes'
// loads in flight; for V = 1 the same additions as ce_row_stats_strided.
template <int V, typename scalar_t>
__device__ __forceinline__ void ce_pixel_stats(const CeKernelArgs<scalar_t>& a, const scalar_t* xp,
                                               RowStats<acc_t_of<scalar_t>> (&st)[V]) {
  using acc_t = acc_t_of<scalar_t>;
  const bool smooth = a.eps > 0.0;
  int64_t c = 0;
  for (; c + 4 <= a.C; c += 4) {
    PixelVec<V, scalar_t> v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = load_pixels<V>(xp + (c + k) * a.P);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const acc_t col[4] = {to_acc(v[0].v[q]), to_acc(v[1].v[q]), to_acc(v[2].v[q]), to_acc(v[3].v[q])};
      stats_add(st[q], col, 4, c, a.class_w, smooth);
    }
  }
  for (; c < a.C; ++c) {
    const PixelVec<V, scalar_t> v = load_pixels<V>(xp + c * a.P);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const acc_t x = to_acc(v.v[q]);
      stats_add(st[q], &x, 1, c, a.class_w, smooth);
    }
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowsBlock) ce_forward_pixels_kernel(CeKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  CePartialSums mine{0.0, 0.0, 0, 0};
  if (p0 < a.P) {  // P is a multiple of V: all V pixels or none
    for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
      const int64_t base = n * a.C * a.P + p0;
      RowStats<acc_t> st[V];
#pragma unroll
      for (int q = 0; q < V; ++q) st[q] = RowStats<acc_t>::empty();
      ce_pixel_stats<V>(a, a.x + base, st);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const CePartialSums r = ce_forward_row_epilogue(a, n * a.P + p0 + q, base + q, st[q]);
        mine.loss_sum += r.loss_sum;
        mine.weight_sum += r.weight_sum;
        mine.valid += r.valid;
      }
    }
  }
  if (a.norm_one != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *a.norm_one = acc_t(1);
  write_block_partial(mine, a.partials, static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x);
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowsBlock) ce_backward_pixels_kernel(CeKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (p0 >= a.P) return;
  for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
    const int64_t base = n * a.C * a.P + p0;
    CeRowGrad<acc_t> g[V];
#pragma unroll
    for (int q = 0; q < V; ++q) g[q] = ce_row_grad(a, n * a.P + p0 + q, base + q);
    ce_grad_pixels<V>(a.x + base, a.grad_x + base, a.P, 0, a.C, g);
  }
}

// Class counts of the non-ignored targets. With `shared_hist`, each block counts into shared
// memory (C counters) first and adds its counts to the global ones once.
__global__ void class_count_kernel(const void* target, bool target_int32, int64_t rows, int64_t C,
                                   int64_t ignore_index, unsigned long long* counts, bool shared_hist) {
  FWL_DYNAMIC_SHARED(unsigned, hist);
  if (shared_hist) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) hist[c] = 0u;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    const int64_t t = load_target(target, target_int32, r);
    if (t == ignore_index) continue;
    FWL_KERNEL_ASSERT(t >= 0 && t < C,
                      "fused_wloss.cross_entropy: target out of range: class indices must be in [0, C) or ignore_index");
    if (shared_hist) {
      atomicAdd(&hist[t], 1u);
    } else {
      atomicAdd(&counts[t], 1ull);
    }
  }
  if (shared_hist) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      if (hist[c] != 0u) atomicAdd(&counts[c], static_cast<unsigned long long>(hist[c]));
    }
  }
}

// One block: class_w[c] = static_w[c] * scheme(counts[c]) (counts may be nullptr: static weights
// only, which are then read and not written; static_w may be nullptr: 1, and class_w is written
// without being read), and *sum_w = sum_c class_w[c], reduced in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kClassWeightThreads) class_weight_kernel(const unsigned long long* counts, int64_t C, int scheme,
                                    double smoothing, double beta, bool has_static, acc_t* class_w, acc_t* sum_w) {
  FWL_SHARED(acc_t, scratch, kWarpSize);
  acc_t local = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t w = has_static ? class_w[c] : acc_t(1);
    if (counts != nullptr) w *= static_cast<acc_t>(scheme_weight(scheme, static_cast<double>(counts[c]), smoothing, beta));
    if (counts != nullptr || !has_static) class_w[c] = w;
    local += w;
  }
  const acc_t total = block_allreduce_sum(local, scratch);
  if (threadIdx.x == 0) *sum_w = total;
}

// One block: the reduced loss from the partials of the forward blocks, and its normaliser. The
// loss is out_t: the input's dtype, or acc_t when the call asked for that (autocast).
template <typename out_t, typename acc_t>
__global__ void ce_finalize_kernel(const CePartialSums* partials, int64_t count, int reduction,
                                   out_t* loss, acc_t* norm_out) {
  FWL_SHARED(double, dscratch, kWarpSize);
  FWL_SHARED(long long, iscratch, kWarpSize);
  double ls = 0, ws = 0;
  long long valid = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    ls += partials[i].loss_sum;
    ws += partials[i].weight_sum;
    valid += partials[i].valid;
  }
  ls = block_allreduce_sum(ls, dscratch);
  ws = block_allreduce_sum(ws, dscratch);
  valid = block_allreduce_sum(valid, iscratch);
  if (threadIdx.x == 0) {
    double norm = 1.0;
    if (reduction == kMean) norm = ws;
    if (reduction == kSampleMean) norm = static_cast<double>(valid);
    if (loss != nullptr) {
      *loss = static_cast<out_t>(norm == 0.0 ? std::numeric_limits<double>::quiet_NaN() : ls / norm);
    }
    *norm_out = static_cast<acc_t>(norm);
  }
}

// ---- cross-entropy, probability targets ----------------------------------------------------
// loss = s (B log_s - D), B = sum_c W_c q'_c, D = sum_c W_c q'_c (x_c - m), q' = keep q + spread;
// gradient g s (B p_c - W_c q'_c) (see csrc/cpu/ce_prob.h). Rows of P == 1 inputs up to 4096
// classes go a group of lanes per row in both passes (ce_prob_*_rows_kernel), wider rows a block
// per row in both (a flat backward over the elements when the rows are few); K-dim pixels a
// thread per pixel in both passes, on the (pixel blocks, images) grid of the index-target kernels
// where an image has a warp's worth of pixels (ce_prob_*_pixels_kernel), else flat over the rows.

template <typename scalar_t>
struct CeProbKernelArgs {
  using acc_t = acc_t_of<scalar_t>;
  const scalar_t* x;
  const void* t;            // scalar_t, or float when t_float
  bool t_float;
  const acc_t* class_w;     // [C] or nullptr
  const acc_t* sample_w;    // [rows] or nullptr
  int64_t rows, C, P;
  int64_t N;                // rows / P
  int group;                // lanes per row of the rows kernels
  double keep, spread;      // q' = keep q + spread
  // forward
  acc_t* stats;             // [3, rows]: lse hi, lse lo, B
  scalar_t* loss_rows;      // [rows] for "none", else nullptr
  acc_t* loss_rows_acc;     // instead of loss_rows under autocast
  CePartialSums* partials;  // [gridDim.x]
  // backward
  const acc_t* grad_out;    // [rows] for "none", else [1]
  const acc_t* norm;        // normaliser of "mean"/"sample_mean", else nullptr
  int reduction;
  scalar_t* grad_x;
};

// The upstream gradient of a "mean"/"sum" (divided by a "mean"'s normaliser, NaN for a zero one).
template <typename scalar_t>
__device__ __forceinline__ acc_t_of<scalar_t> ce_prob_upstream_all(const CeProbKernelArgs<scalar_t>& a) {
  using acc_t = acc_t_of<scalar_t>;
  if (a.reduction == kNone) return acc_t(0);
  const acc_t g = a.grad_out[0];
  if (a.norm == nullptr) return g;
  return *a.norm == acc_t(0) ? std::numeric_limits<acc_t>::quiet_NaN() : g / *a.norm;
}

template <typename scalar_t>
__device__ __forceinline__ acc_t_of<scalar_t> prob_target(const CeProbKernelArgs<scalar_t>& a, int64_t i) {
  return a.t_float ? static_cast<acc_t_of<scalar_t>>(static_cast<const float*>(a.t)[i])
                   : to_acc(static_cast<const scalar_t*>(a.t)[i]);
}

// W_c q'_c of element i (class c), q' = keep q + spread
template <typename scalar_t>
__device__ __forceinline__ acc_t_of<scalar_t> ce_prob_weighted_target(const CeProbKernelArgs<scalar_t>& a, int64_t i,
                                                                      int64_t c) {
  using acc_t = acc_t_of<scalar_t>;
  const acc_t qs = a.spread != 0.0 ? static_cast<acc_t>(a.keep) * prob_target(a, i) + static_cast<acc_t>(a.spread)
                                   : prob_target(a, i);
  return a.class_w ? a.class_w[c] * qs : qs;
}

// One element's epilogue in float64, from its maximum m, sum of exponentials s, b = sum W q' and
// d = sum W q' (x - m) (summed over q' itself, as csrc/cpu/ce_prob.h): its loss, statistics and
// partial sums.
template <typename scalar_t>
__device__ CePartialSums ce_prob_finish(const CeProbKernelArgs<scalar_t>& a, int64_t row, double m, double s,
                                        double b, double d) {
  using acc_t = acc_t_of<scalar_t>;
  const double log_s = log(s);
  const double sr = a.sample_w ? static_cast<double>(a.sample_w[row]) : 1.0;
  const double loss = sr * (b * log_s - d);
  const LseParts<acc_t> lse = split_lse<acc_t>(m, log_s);
  a.stats[row] = lse.hi;
  a.stats[a.rows + row] = lse.lo;
  a.stats[2 * a.rows + row] = static_cast<acc_t>(b);
  if (a.loss_rows_acc) {
    a.loss_rows_acc[row] = static_cast<acc_t>(loss);
  } else if (a.loss_rows) {
    a.loss_rows[row] = static_cast<scalar_t>(loss);
  }
  return CePartialSums{loss, sr, 1, 0};
}

// One K-dim pixel's forward, its classes a plane apart from `base`: two passes, as the rows.
template <typename scalar_t>
__device__ __forceinline__ CePartialSums ce_prob_pixel(const CeProbKernelArgs<scalar_t>& a, int64_t row, int64_t base) {
  using acc_t = acc_t_of<scalar_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < a.C; ++c) m = MaxOp{}(m, to_acc(a.x[base + c * a.P]));
  acc_t s = 0, b = 0, dsum = 0;
  for (int64_t c = 0; c < a.C; ++c) {
    const acc_t d = to_acc(a.x[base + c * a.P]) - m;
    s += exp_acc(d);
    const acc_t wq = ce_prob_weighted_target(a, base + c * a.P, c);
    b += wq;
    dsum += wq * d;
  }
  return ce_prob_finish(a, row, m, s, b, dsum);
}

template <typename scalar_t, bool kBlockPerRow>
__global__ void ce_prob_forward_kernel(CeProbKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  FWL_SHARED(acc_t, scratch, kWarpSize);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (kBlockPerRow) {  // P == 1: a row's classes spread over the block; rows gridDim.x apart
    CePartialSums part{0.0, 0.0, 0, 0};  // thread 0's, over its rows in order: deterministic
    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
      const int64_t base = row * a.C;
      acc_t m = neg_inf;
      for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) m = MaxOp{}(m, to_acc(a.x[base + c]));
      m = block_allreduce(m, scratch, MaxOp{}, neg_inf);
      acc_t s = 0, b = 0, dsum = 0;
      for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {
        const acc_t d = to_acc(a.x[base + c]) - m;
        s += exp_acc(d);
        const acc_t wq = ce_prob_weighted_target(a, base + c, c);
        b += wq;
        dsum += wq * d;
      }
      s = block_allreduce_sum(s, scratch);
      b = block_allreduce_sum(b, scratch);
      dsum = block_allreduce_sum(dsum, scratch);
      if (threadIdx.x == 0) {
        const CePartialSums r = ce_prob_finish(a, row, m, s, b, dsum);
        part.loss_sum += r.loss_sum;
        part.weight_sum += r.weight_sum;
        part.valid += r.valid;
      }
    }
    if (threadIdx.x == 0) a.partials[blockIdx.x] = part;
    return;
  }
  // K-dim: a thread per pixel, its classes a plane apart
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const CePartialSums out = row < a.rows ? ce_prob_pixel(a, row, ce_row_offset(row, a.C, a.P)) : CePartialSums{0.0, 0.0, 0, 0};
  write_block_partial(out, a.partials, blockIdx.x);
}

// Rows of at most 4096 classes (P == 1): a group of a.group lanes per row, blockDim / group rows a
// block, the lanes of a row on neighbouring classes (coalesced). Two passes over the row, as the
// block-per-row path: its maximum, then (from cache) the exponentials, B and D; group shuffles
// reduce each, lane 0 finishes the row, the block writes one partial sum.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowsBlock) ce_prob_forward_rows_kernel(CeProbKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  const int group = a.group;
  const int lane = static_cast<int>(threadIdx.x) % group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  const bool active = row < a.rows;
  const int64_t base = row * a.C;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  if (active) {
    for (int64_t c = lane; c < a.C; c += group) m = MaxOp{}(m, to_acc(a.x[base + c]));
  }
  m = group_allreduce(m, group, MaxOp{});  // every lane takes part, active or not
  acc_t s = 0, b = 0, dsum = 0;
  if (active) {
    for (int64_t c = lane; c < a.C; c += group) {
      const acc_t d = to_acc(a.x[base + c]) - m;
      s += exp_acc(d);
      const acc_t wq = ce_prob_weighted_target(a, base + c, c);
      b += wq;
      dsum += wq * d;
    }
  }
  s = group_allreduce(s, group, SumOp{});
  b = group_allreduce(b, group, SumOp{});
  dsum = group_allreduce(dsum, group, SumOp{});
  const CePartialSums mine = lane == 0 && active ? ce_prob_finish(a, row, m, s, b, dsum) : CePartialSums{0.0, 0.0, 0, 0};
  write_block_partial(mine, a.partials, blockIdx.x);
}

// What the soft-target backward needs of one row (or pixel): its gradient at logit x of class c,
// element i, is g (bf exp(x - ref) - W_c q'_c), with g the upstream gradient times the sample
// weight, ref the lse's hi part and bf = B exp(-lo) (p = exp(x - hi) exp(-lo)).
template <typename acc_t>
struct CeProbRowGrad {
  acc_t g, ref, bf;
};

template <typename scalar_t>
__device__ __forceinline__ CeProbRowGrad<acc_t_of<scalar_t>> ce_prob_row_grad(const CeProbKernelArgs<scalar_t>& a,
                                                                              int64_t row,
                                                                              acc_t_of<scalar_t> g_all) {
  using acc_t = acc_t_of<scalar_t>;
  const acc_t g = (a.reduction == kNone ? a.grad_out[row] : g_all) * (a.sample_w ? a.sample_w[row] : acc_t(1));
  return {g, a.stats[row], a.stats[2 * a.rows + row] * exp_acc(-a.stats[a.rows + row])};
}

// The backward of the same rows, mapped alike (and of wider rows with a.group = blockDim, a block
// a row: it needs no shuffles): the row's statistics loaded once, one exponential an element, no
// division.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowsBlock) ce_prob_backward_rows_kernel(CeProbKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  const int group = a.group;
  const int lane = static_cast<int>(threadIdx.x) % group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (row >= a.rows) return;
  const CeProbRowGrad<acc_t> r = ce_prob_row_grad(a, row, ce_prob_upstream_all(a));
  const int64_t base = row * a.C;
  for (int64_t c = lane; c < a.C; c += group) {
    const acc_t e = exp_acc(to_acc(a.x[base + c]) - r.ref);
    a.grad_x[base + c] = static_cast<scalar_t>(r.g * (r.bf * e - ce_prob_weighted_target(a, base + c, c)));
  }
}

// K-dim on the (pixel blocks, images) grid (see ce_forward_pixels_kernel): a thread per pixel, no
// division; one partial sum per block.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowsBlock) ce_prob_forward_pixels_kernel(CeProbKernelArgs<scalar_t> a) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  CePartialSums mine{0.0, 0.0, 0, 0};
  if (p < a.P) {
    for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
      const CePartialSums r = ce_prob_pixel(a, n * a.P + p, n * a.C * a.P + p);
      mine.loss_sum += r.loss_sum;
      mine.weight_sum += r.weight_sum;
      mine.valid += r.valid;
    }
  }
  write_block_partial(mine, a.partials, static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x);
}

// Its backward: the pixel's statistics once, four classes' logits in flight, one exponential an
// element, no division (the flat kernel below divides every element's index twice).
template <typename scalar_t>
__global__ void __launch_bounds__(kRowsBlock) ce_prob_backward_pixels_kernel(CeProbKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= a.P) return;
  const acc_t g_all = ce_prob_upstream_all(a);
  for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
    const int64_t row = n * a.P + p, base = n * a.C * a.P + p;
    const CeProbRowGrad<acc_t> r = ce_prob_row_grad(a, row, g_all);
    auto grad = [&](acc_t x, int64_t c) {
      return static_cast<scalar_t>(r.g * (r.bf * exp_acc(x - r.ref) - ce_prob_weighted_target(a, base + c * a.P, c)));
    };
    int64_t c = 0;
    for (; c + 4 <= a.C; c += 4) {
      acc_t v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = to_acc(a.x[base + (c + k) * a.P]);
#pragma unroll
      for (int k = 0; k < 4; ++k) a.grad_x[base + (c + k) * a.P] = grad(v[k], c + k);
    }
    for (; c < a.C; ++c) a.grad_x[base + c * a.P] = grad(to_acc(a.x[base + c * a.P]), c);
  }
}

template <typename scalar_t>
__global__ void ce_prob_backward_kernel(CeProbKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t numel = a.rows * a.C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const acc_t g_all = ce_prob_upstream_all(a);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    int64_t row, c;
    if (a.P == 1) {
      row = i / a.C;
      c = i - row * a.C;
    } else {
      const int64_t n = i / (a.C * a.P);
      const int64_t rem = i - n * a.C * a.P;
      c = rem / a.P;
      row = n * a.P + (rem - c * a.P);
    }
    const acc_t g = (a.reduction == kNone ? a.grad_out[row] : g_all) * (a.sample_w ? a.sample_w[row] : acc_t(1));
    const acc_t p = exp_acc(to_acc(a.x[i]) - a.stats[row]) * exp_acc(-a.stats[a.rows + row]);
    a.grad_x[i] = static_cast<scalar_t>(g * (a.stats[2 * a.rows + row] * p - ce_prob_weighted_target(a, i, c)));
  }
}

// ---- binary cross-entropy ------------------------------------------------------------------

constexpr int kBceThreads = 256;
constexpr int kBceLabelSumThreads = 256;

template <typename scalar_t>
struct BceKernelArgs {
  using acc_t = acc_t_of<scalar_t>;
  const scalar_t* x;
  const void* t;            // scalar_t, or float when t_float
  bool t_float;             // float32 targets with float16/bfloat16 logits
  int64_t numel, L;
  int64_t elems_per_block;   // forward: a multiple of bce_vector_elems
  bool vectorized;          // logits, targets and outputs 16-byte aligned: whole vectors at a time
  const acc_t* neg_label;   // [L] or nullptr (1)
  const acc_t* pos_label;   // [L] or nullptr (1)
  const acc_t* elem_w;      // [numel] or nullptr
  const acc_t* elem_pos_w;  // [numel] or nullptr
  const acc_t* sample_w;    // [numel / L] or nullptr
  acc_t gamma, alpha;       // sigmoid focal loss; gamma 0 and alpha < 0 for plain BCE
  // forward
  scalar_t* loss_elems;     // [numel] for "none", else nullptr
  acc_t* loss_elems_acc;    // instead of loss_elems when the loss is asked for in acc_t (autocast)
  double* partials;         // [gridDim.x]
  // backward
  const acc_t* grad_out;    // [numel] for "none", else [1]
  int reduction;
  scalar_t* grad_x;
};

// Target i in acc_t, from the logits' dtype or from float32 (a uniform branch: one call's targets
// have one dtype).
template <typename scalar_t>
__device__ __forceinline__ acc_t_of<scalar_t> bce_target(const BceKernelArgs<scalar_t>& a, int64_t i) {
  return a.t_float ? static_cast<acc_t_of<scalar_t>>(static_cast<const float*>(a.t)[i])
                   : to_acc(static_cast<const scalar_t*>(a.t)[i]);
}

// The row and label of a flat BCE index, carried along a thread's walk without a division per
// element: one division where the walk starts, then a carry per step.
struct LabelCursor {
  int64_t row = 0, label = 0;
  __device__ __forceinline__ void start(int64_t i, int64_t L) {
    row = i / L;
    label = i - row * L;
  }
  __device__ __forceinline__ void next(int64_t L) {
    if (++label == L) {
      label = 0;
      ++row;
    }
  }
  // by a stride of rows * L + labels elements, labels < L
  __device__ __forceinline__ void jump(int64_t rows, int64_t labels, int64_t L) {
    row += rows;
    label += labels;
    if (label >= L) {
      label -= L;
      ++row;
    }
  }
};

// The weights of element i, of row `row` and label `l`: w (static x sample weight), neg and pos
// (label and pos weights).
template <typename acc_t, typename Args>
__device__ __forceinline__ void bce_weights(const Args& a, int64_t i, int64_t row, int64_t l, acc_t* w, acc_t* neg,
                                            acc_t* pos) {
  *neg = a.neg_label ? a.neg_label[l] : acc_t(1);
  *pos = a.pos_label ? a.pos_label[l] : acc_t(1);
  if (a.elem_pos_w) *pos *= a.elem_pos_w[i];
  *w = a.elem_w ? a.elem_w[i] : acc_t(1);
  if (a.sample_w) *w *= a.sample_w[row];
}

// Whether the weights of an element need its row and label (else the cursor is never read).
template <typename Args>
__device__ __forceinline__ bool bce_needs_cursor(const Args& a) {
  return a.neg_label || a.pos_label || a.sample_w;
}

template <typename acc_t, typename Args>
__device__ __forceinline__ acc_t bce_element_loss(const Args& a, acc_t x, acc_t t, acc_t neg, acc_t pos) {
  return a.gamma != acc_t(0) || a.alpha >= acc_t(0) ? bce_focal_loss(x, t, neg, pos, a.gamma, a.alpha)
                                                    : bce_loss(x, t, neg, pos);
}

template <typename acc_t, typename Args>
__device__ __forceinline__ acc_t bce_element_grad(const Args& a, acc_t x, acc_t t, acc_t neg, acc_t pos) {
  return a.gamma != acc_t(0) || a.alpha >= acc_t(0) ? bce_focal_grad(x, t, neg, pos, a.gamma, a.alpha)
                                                    : bce_grad(x, t, neg, pos);
}

// Elements a thread takes at a time on the vector path: one 16-byte vector of the logits.
template <typename scalar_t>
constexpr int bce_vector_elems() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// n = bce_vector_elems elements from p (16-byte aligned) as acc_t: one or two 16-byte loads.
template <int n, typename T, typename acc_t>
__device__ __forceinline__ void load_elems(const T* p, acc_t* out) {
  constexpr int per = Pack<T>::kSize;
  static_assert(n % per == 0, "whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < n / per; ++k) {
    const Pack<T> v = load_pack(p + k * per);
#pragma unroll
    for (int j = 0; j < per; ++j) out[k * per + j] = static_cast<acc_t>(v.v[j]);
  }
}

template <int n, typename T, typename acc_t>
__device__ __forceinline__ void store_elems(T* p, const acc_t* in) {
  constexpr int per = Pack<T>::kSize;
  static_assert(n % per == 0, "whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < n / per; ++k) {
    Pack<T> v;
#pragma unroll
    for (int j = 0; j < per; ++j) v.v[j] = static_cast<T>(in[k * per + j]);
    store_pack(p + k * per, v);
  }
}

// The targets of a vector: of the logits' dtype, or float32 with half-precision logits (t_float, a
// uniform branch).
template <int n, typename scalar_t>
__device__ __forceinline__ void load_targets(const BceKernelArgs<scalar_t>& a, int64_t i, acc_t_of<scalar_t>* out) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (a.t_float) return load_elems<n>(static_cast<const float*>(a.t) + i, out);
  }
  load_elems<n>(static_cast<const scalar_t*>(a.t) + i, out);
}

// The two walks of both BCE kernels, from element i to `end` in steps of `stride`:
// value(k, x, t, w, neg, pos) gives element k's output from its logit, target and weights, and
// store(k, out) writes it. bce_vectors takes V = bce_vector_elems elements a step (16-byte loads
// and stores; i and stride multiples of V) with the (row, label) cursor carried along;
// bce_elements one element a step, for misaligned operands and the last partial vector.
template <int V, typename scalar_t, typename Value, typename Store>
__device__ __forceinline__ void bce_vectors(const BceKernelArgs<scalar_t>& a, int64_t i, int64_t end, int64_t stride,
                                            Value value, Store store) {
  using acc_t = acc_t_of<scalar_t>;
  const bool cursor = bce_needs_cursor(a);
  LabelCursor cur;
  int64_t jump_rows = 0, jump_labels = 0;
  if (cursor && i < end) {
    cur.start(i, a.L);
    jump_rows = stride / a.L;
    jump_labels = stride - jump_rows * a.L;
  }
  for (; i < end; i += stride) {
    acc_t xv[V], tv[V], out[V];
    load_elems<V>(a.x + i, xv);
    load_targets<V>(a, i, tv);
    LabelCursor e = cur;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t w, neg, pos;
      bce_weights(a, i + j, e.row, e.label, &w, &neg, &pos);
      out[j] = value(i + j, xv[j], tv[j], w, neg, pos);
      if (cursor) e.next(a.L);
    }
    store(i, out);
    if (cursor) cur.jump(jump_rows, jump_labels, a.L);
  }
}

template <typename scalar_t, typename Value, typename Store>
__device__ __forceinline__ void bce_elements(const BceKernelArgs<scalar_t>& a, int64_t k, int64_t end, int64_t stride,
                                             Value value, Store store) {
  using acc_t = acc_t_of<scalar_t>;
  const bool cursor = bce_needs_cursor(a);
  for (; k < end; k += stride) {
    LabelCursor e;
    if (cursor) e.start(k, a.L);
    acc_t w, neg, pos;
    bce_weights(a, k, e.row, e.label, &w, &neg, &pos);
    store(k, value(k, to_acc(a.x[k]), bce_target(a, k), w, neg, pos));
  }
}

// Forward: block b takes elements [b * elems_per_block, ...) (a multiple of the vector), its
// threads a vector at a time where every operand is aligned (a.vectorized), element by element
// otherwise and in the last partial vector; one partial sum per block, added in a fixed order by
// bce_finalize_kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kBceThreads) bce_forward_kernel(BceKernelArgs<scalar_t> a) {
  using acc_t = acc_t_of<scalar_t>;
  constexpr int V = bce_vector_elems<scalar_t>();
  FWL_SHARED(double, scratch, kWarpSize);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * a.elems_per_block;
  const int64_t end = begin + a.elems_per_block < a.numel ? begin + a.elems_per_block : a.numel;
  const int64_t vec_end = a.vectorized ? begin + (end - begin) / V * V : begin;
  acc_t sum = 0;
  auto loss = [&](int64_t, acc_t x, acc_t t, acc_t w, acc_t neg, acc_t pos) {
    const acc_t l = w * bce_element_loss(a, x, t, neg, pos);
    sum += l;
    return l;
  };
  bce_vectors<V>(a, begin + static_cast<int64_t>(threadIdx.x) * V, vec_end, static_cast<int64_t>(blockDim.x) * V, loss,
                 [&](int64_t i, const acc_t* out) {
                   if (a.loss_elems_acc) {
                     store_elems<V>(a.loss_elems_acc + i, out);
                   } else if (a.loss_elems) {
                     store_elems<V>(a.loss_elems + i, out);
                   }
                 });
  bce_elements(a, vec_end + threadIdx.x, end, blockDim.x, loss, [&](int64_t k, acc_t l) {
    if (a.loss_elems_acc) {
      a.loss_elems_acc[k] = l;
    } else if (a.loss_elems) {
      a.loss_elems[k] = static_cast<scalar_t>(l);
    }
  });
  const double total = block_allreduce_sum(static_cast<double>(sum), scratch);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
}

template <typename out_t>
__global__ void bce_finalize_kernel(const double* partials, int64_t count, double divisor, out_t* loss) {
  FWL_SHARED(double, scratch, kWarpSize);
  double s = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
  s = block_allreduce_sum(s, scratch);
  if (threadIdx.x == 0) *loss = static_cast<out_t>(s / divisor);
}

// Backward: a grid-stride walk over vectors (as the forward, where a.vectorized), then the
// elements past the last whole vector; reads the logits and targets once, writes the gradient once.
template <typename scalar_t>
__global__ void __launch_bounds__(kBceThreads) bce_backward_kernel(BceKernelArgs<scalar_t> a, double divisor) {
  using acc_t = acc_t_of<scalar_t>;
  constexpr int V = bce_vector_elems<scalar_t>();
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const acc_t g_all = a.reduction == kNone ? acc_t(0) : static_cast<acc_t>(to_acc(a.grad_out[0]) / divisor);
  const int64_t vec_end = a.vectorized ? a.numel / V * V : 0;
  auto grad = [&](int64_t k, acc_t x, acc_t t, acc_t w, acc_t neg, acc_t pos) {
    const acc_t g = a.reduction == kNone ? to_acc(a.grad_out[k]) : g_all;
    return g * w * bce_element_grad(a, x, t, neg, pos);
  };
  bce_vectors<V>(a, tid * V, vec_end, threads * V, grad,
                 [&](int64_t i, const acc_t* out) { store_elems<V>(a.grad_x + i, out); });
  bce_elements(a, vec_end + tid, a.numel, threads, grad,
               [&](int64_t k, acc_t d) { a.grad_x[k] = static_cast<scalar_t>(d); });
}

// Stage 1 of the per-label target sums: block s adds rows [s * per, (s + 1) * per) of every label.
// With L >= blockDim.x labels a thread per label walks the rows (neighbouring threads on
// neighbouring labels); with fewer, blockDim.x / L groups of L threads take every groups-th row
// (the block's threads still read one contiguous run at a time) and thread l adds the groups' sums
// of label l in group order, so the sums are the same for any GPU.
template <typename scalar_t>
__global__ void __launch_bounds__(kBceLabelSumThreads) bce_label_sum_kernel(const scalar_t* t, int64_t rows, int64_t L,
                                                                       int64_t per, double* part) {
  FWL_SHARED(double, group_sums, kBceLabelSumThreads);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  if (L >= blockDim.x) {
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      double s = 0;
      for (int64_t r = r0; r < r1; ++r) s += static_cast<double>(to_acc(t[r * L + l]));
      part[blockIdx.x * L + l] = s;
    }
    return;
  }
  const int groups = static_cast<int>(blockDim.x / L);
  const int g = static_cast<int>(threadIdx.x / L), l = static_cast<int>(threadIdx.x - g * L);
  double s = 0;
  if (g < groups) {
    for (int64_t r = r0 + g; r < r1; r += groups) s += static_cast<double>(to_acc(t[r * L + l]));
  }
  group_sums[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x < L) {
    double total = 0;
    for (int k = 0; k < groups; ++k) total += group_sums[k * L + threadIdx.x];
    part[blockIdx.x * L + threadIdx.x] = total;
  }
}

// Stage 2: the segment sums of each label in segment order, then the dynamic weights of its
// positive part and (balanced) of its negative part.
template <typename acc_t>
__global__ void bce_label_weight_kernel(const double* part, int64_t segments, int64_t rows, int64_t L,
                                        int64_t per, int scheme, double smoothing, double beta, bool balanced,
                                        acc_t* neg_w, acc_t* pos_w) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= L) return;
  double npos = 0, nneg = 0;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t r1 = (s + 1) * per < rows ? (s + 1) * per : rows;
    const double in_segment = static_cast<double>(r1 - s * per > 0 ? r1 - s * per : 0);
    npos += part[s * L + l];
    nneg += in_segment - part[s * L + l];
  }
  const acc_t pw = static_cast<acc_t>(scheme_weight(scheme, npos, smoothing, beta));
  pos_w[l] = pw;
  neg_w[l] = balanced ? static_cast<acc_t>(scheme_weight(scheme, nneg, smoothing, beta)) : pw;
}

}  // namespace cuda
}  // namespace fused_wloss
