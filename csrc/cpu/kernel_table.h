// The interface between the CPU operators (csrc/cpu/losses_cpu.cpp, in fused_wloss._C) and the
// vectorised row kernels (csrc/cpu/kernels_isa.cpp), which are compiled once per instruction set
// (default, AVX2, AVX-512) into separate modules and picked at import time, the way ATen
// dispatches its own kernels by CPU capability.
//
// Only plain data crosses this boundary: raw pointers, sizes and function pointers, so the
// per-ISA modules need no at::Tensor and the table has a C layout.
#pragma once

#include <cstdint>

namespace fused_wloss {
namespace cpu {

enum DtypeIndex : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3, kNumDtypes = 4 };

// How the rows of a cross-entropy input are cut into work chunks. The cut depends only on the
// shape, never on the number of threads, so per-chunk partial sums reduced in chunk order give
// bitwise-identical results for any thread count.
struct CeLayout {
  int64_t N, C, P;         // input viewed as (N, C, P), contiguous
  int64_t rows_per_chunk;  // rows (or pixels, for P > 1) of one chunk
  int64_t chunks_per_n;    // P > 1: chunks that cover the P pixels of one sample; else 1
  int64_t num_chunks;
  bool tiled;              // P == 1 and small C: rows packed into [C][lanes] tiles
};

// What the forward and the backward of cross-entropy both read.
struct CeInputs {
  CeLayout layout;
  const void* input;         // scalar_t[N * C * P]
  const void* target;        // int64_t or int32_t [N * P]
  bool target_int32;
  const void* class_w;       // acc_t[C] (static x dynamic), or nullptr for none
  const void* sample_w;      // acc_t[N * P], or nullptr
  double sum_w;              // sum_c class_w[c] (C without class weights)
  int64_t ignore_index;
  double label_smoothing;
  double gamma;              // focal-loss focusing; 0 for plain cross-entropy
};

struct CeForwardArgs {
  CeInputs in;
  void* loss_out;            // scalar_t[N * P] for reduction "none", else nullptr
  bool loss_out_acc;         // loss_out is acc_t[N * P] instead (loss_dtype, under autocast)
  // The log-sum-exp of each row as two acc_t parts, lse = hi + lo (split_lse in
  // fused_wloss_math.h): the forward's lse tensor, shape (2, N * P), row 0 hi and row 1 lo.
  void* lse_hi_out;          // acc_t[N * P]
  void* lse_lo_out;          // acc_t[N * P]
};

// What one chunk of the forward adds up; reduced over chunks in chunk order.
struct CePartial {
  double loss_sum;    // sum of the element losses
  double weight_sum;  // sum of s_i v_i W[t_i] (the "mean" normaliser)
  int64_t valid;      // number of non-ignored elements
  int64_t bad_row;    // first row whose target is out of range, or -1
  int64_t bad_value;
};

struct CeBackwardArgs {
  CeInputs in;
  const void* lse_hi;        // acc_t[N * P], from the forward (see CeForwardArgs)
  const void* lse_lo;        // acc_t[N * P]
  const void* grad_rows;     // acc_t[N * P] upstream gradient per row ("none"), or nullptr
  double grad_scalar;        // upstream gradient / normaliser, when grad_rows is nullptr
  void* grad_input;          // scalar_t[N * C * P]
  bool streaming_stores;     // write the rows layout's gradient with non-temporal stores
};

// Cross-entropy with probability targets q of the input's layout (N, C, P):
//   loss = s (B log_s - D), B = sum_c W_c q'_c, D = sum_c W_c q'_c (x_c - m), q' = (1 - eps) q + eps / C
// (m the row maximum, log_s the log of sum_c exp(x_c - m)); the backward's gradient is
//   g s (B p_c - W_c q'_c).
struct CeProbArgs {
  CeLayout layout;           // P == 1: row by row (the tiled flag is not used); P > 1: pixel vectors
  const void* input;         // scalar_t[N * C * P]
  const void* target;        // scalar_t[N * C * P], or float when target_float
  bool target_float;         // float32 targets with float16/bfloat16 input
  const void* class_w;       // acc_t[C] (static x dynamic), or nullptr
  const void* sample_w;      // acc_t[N * P], or nullptr
  double label_smoothing;
  // forward
  void* loss_out;            // scalar_t[N * P] ("none"), acc_t when loss_out_acc, else nullptr
  bool loss_out_acc;
  void* stats_out;           // acc_t[3, N * P]: lse hi, lse lo, B
  // backward
  const void* stats;         // acc_t[3, N * P], from the forward
  const void* grad_rows;     // acc_t[N * P] ("none"), or nullptr
  double grad_scalar;        // upstream gradient / normaliser, when grad_rows is nullptr
  void* grad_input;          // scalar_t[N * C * P]
};

// Binary cross-entropy: input viewed as (rows, L) contiguous, chunks of whole rows.
// The padding of BceArgs' per-label arrays: at least the longest vector of any build (16 floats).
constexpr int64_t kLabelPad = 16;

struct BceArgs {
  int64_t rows, L;
  int64_t rows_per_chunk, num_chunks;
  const void* input;          // scalar_t[rows * L]
  const void* target;         // scalar_t[rows * L], or float[rows * L] when target_float
  bool target_float;          // float32 targets with float16/bfloat16 input
  // Per-label weights of the negative and positive part (static per-label weight, pos_weight and
  // dynamic weights folded in), acc_t[L + kLabelPad] with entry m the weight of label m % L: a
  // vector of the flat loop starting at label l reads entries [l, l + V) whatever row it ends in,
  // and the array stays in L1 for any L up to a few thousand. nullptr means 1.
  const void* neg_label_w;
  const void* pos_label_w;
  const void* elem_w;         // acc_t[rows * L] static weight per element, or nullptr
  const void* elem_pos_w;     // acc_t[rows * L] pos_weight per element, or nullptr
  const void* sample_w;       // acc_t[rows], or nullptr
  // forward
  void* loss_out;             // scalar_t[rows * L] for "none", else nullptr
  bool loss_out_acc;          // loss_out is acc_t[rows * L] instead (loss_dtype, under autocast)
  // backward
  const void* grad_elems;     // acc_t[rows * L] upstream gradient ("none"), or nullptr
  double grad_scalar;
  void* grad_input;           // scalar_t[rows * L]
  // sigmoid focal loss (bce_focal_loss): gamma 0 and alpha < 0 for plain BCE
  double gamma, alpha;
  bool streaming_stores;      // write the gradient with non-temporal stores (a large float32 one)
};

using CeForwardFn = void (*)(const CeForwardArgs&, int64_t chunk, CePartial* out);
using CeBackwardFn = void (*)(const CeBackwardArgs&, int64_t chunk);
using CeProbForwardFn = void (*)(const CeProbArgs&, int64_t chunk, CePartial* out);
using CeProbBackwardFn = void (*)(const CeProbArgs&, int64_t chunk);
using BceForwardFn = double (*)(const BceArgs&, int64_t chunk);  // returns the chunk's loss sum
using BceBackwardFn = void (*)(const BceArgs&, int64_t chunk);
// Adds rows [r0, r1) of (rows, L) contiguous targets into acc[L] (float64), per label.
using BceLabelSumsFn = void (*)(const void* target, int64_t L, int64_t r0, int64_t r1, double* acc);

struct KernelTable {
  const char* isa;  // "default", "avx2", "avx512"
  int vector_bytes;
  CeForwardFn ce_forward[kNumDtypes];
  CeBackwardFn ce_backward[kNumDtypes];
  BceForwardFn bce_forward[kNumDtypes];
  BceBackwardFn bce_backward[kNumDtypes];
  BceLabelSumsFn bce_label_sums[kNumDtypes];
  CeProbForwardFn ce_prob_forward[kNumDtypes];
  CeProbBackwardFn ce_prob_backward[kNumDtypes];
};

// Rows of one tile of the tiled (small C) and the K-dim paths: a multiple of every vector width.
constexpr int64_t kTileLanes = 16;

inline CeLayout make_ce_layout(int64_t N, int64_t C, int64_t P) {
  CeLayout l{N, C, P, 0, 1, 0, false};
  // about 32K logits a chunk: large enough to amortise the chunk bookkeeping, small enough to
  // balance threads
  const int64_t target_elems = 32768;
  if (P > 1) {
    int64_t px = target_elems / (C > 0 ? C : 1);
    px = px < kTileLanes ? kTileLanes : (px / kTileLanes) * kTileLanes;
    if (px > P) px = ((P + kTileLanes - 1) / kTileLanes) * kTileLanes;
    l.rows_per_chunk = px;
    l.chunks_per_n = (P + px - 1) / px;
    l.num_chunks = N * l.chunks_per_n;
  } else {
    l.tiled = C < 2 * kTileLanes;
    int64_t r = target_elems / (C > 0 ? C : 1);
    if (r < 1) r = 1;
    if (l.tiled) r = ((r + kTileLanes - 1) / kTileLanes) * kTileLanes;
    l.rows_per_chunk = r;
    l.num_chunks = (N + r - 1) / r;
  }
  return l;
}

}  // namespace cpu
}  // namespace fused_wloss

// Each per-ISA module exposes its table to Python as a capsule of this name, which
// fused_wloss._C.set_cpu_kernels installs (see fused_wloss/_extension.py).
#define FWL_KERNEL_TABLE_CAPSULE "fused_wloss.cpu_kernel_table"
