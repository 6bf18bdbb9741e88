// Host-side helpers shared by the CPU and CUDA operators (csrc/cpu/losses_cpu.cpp,
// csrc/cuda/losses_host.h): shape and argument checks with the messages users see, and the
// views of the optional weight tensors the kernels read. Only at::Tensor operations that run on
// any device, so nothing here synchronises with a GPU.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "fused_wloss_math.h"

namespace fused_wloss {

inline at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_kernel_dtype(at::ScalarType s) {
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "fused_wloss: input must be float32, float64, float16 or bfloat16, got ", s);
}

// The dtype of a forward operator's loss (schemas.h, loss_dtype): the input's, or its accumulation
// dtype, in which the kernels then write the loss directly.
inline at::ScalarType loss_dtype_of(const c10::optional<at::ScalarType>& loss_dtype, at::ScalarType input) {
  if (!loss_dtype.has_value()) return input;
  TORCH_CHECK(*loss_dtype == input || *loss_dtype == acc_dtype(input), "fused_wloss: loss_dtype must be the "
              "input's dtype (", input, ") or its accumulation dtype (", acc_dtype(input), "), got ", *loss_dtype);
  return *loss_dtype;
}

// The upstream gradient a backward operator takes: `elements` values for reduction "none", one
// for a reduced loss.
inline void check_grad_loss(const at::Tensor& grad_loss, int64_t reduction, int64_t elements) {
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.numel() == elements, "fused_wloss: grad_loss must have ", elements, " elements, got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "fused_wloss: grad_loss of a reduced loss must have one element, got ",
                grad_loss.sizes());
  }
}

// The logits cross_entropy_grad_ writes its gradient over: (rows, C), contiguous.
inline void check_inplace_logits(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous(),
              "fused_wloss.cross_entropy_grad_: input must be contiguous logits of shape (N, C), got shape ",
              input.sizes(), input.is_contiguous() ? "" : " (not contiguous)");
}

// An optional float tensor as a contiguous acc_t array of `numel` elements.
inline at::Tensor as_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc, const char* name,
                  int64_t numel) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->is_floating_point(), "fused_wloss: ", name, " must be floating point, got ",
              t->scalar_type());
  TORCH_CHECK(t->numel() == numel, "fused_wloss: ", name, " must have ", numel,
              " elements, got shape ", t->sizes());
  return t->to(acc).contiguous().reshape({numel});
}

struct CeShape {
  int64_t N, C, P;
  std::vector<int64_t> loss_shape;
};

inline CeShape ce_shape(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK(input.dim() >= 1, "fused_wloss.cross_entropy: input must have shape (C,), (N, C) or "
              "(N, C, d1, ..., dk), got a 0-d tensor");
  CeShape s;
  if (input.dim() == 1) {
    s = {1, input.size(0), 1, {}};
  } else {
    s.N = input.size(0);
    s.C = input.size(1);
    s.P = 1;
    s.loss_shape.push_back(s.N);
    for (int64_t d = 2; d < input.dim(); ++d) {
      s.P *= input.size(d);
      s.loss_shape.push_back(input.size(d));
    }
  }
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "fused_wloss.cross_entropy: target must hold class indices as int64 or int32, got ",
              target.scalar_type());
  TORCH_CHECK(target.sizes() == at::IntArrayRef(s.loss_shape),
              "fused_wloss.cross_entropy: target must have shape ", at::IntArrayRef(s.loss_shape),
              " for input of shape ", input.sizes(), ", got ", target.sizes());
  return s;
}

// K-dim logits (N, C, d1, ..., dk) whose classes are innermost in memory (channels_last,
// channels_last_3d, or any layout in which (N, d1, ..., dk, C) is contiguous) are already rows of C
// classes, in the targets' order: the kernels read them in place as (N * d1 * ... * dk, C) instead
// of a contiguous copy, and write the gradient in the same layout (ce_grad_like_input).
inline std::vector<int64_t> classes_last_order(int64_t dim) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < dim; ++d) order.push_back(d);
  order.push_back(1);
  return order;
}

// The (rows, C) view of such logits, or an undefined tensor for any other input.
inline at::Tensor classes_last_rows(const at::Tensor& input) {
  if (input.dim() < 3 || input.numel() == 0) return at::Tensor();
  const at::Tensor moved = input.permute(classes_last_order(input.dim()));
  if (!moved.is_contiguous()) return at::Tensor();
  return moved.view({-1, input.size(1)});
}

// The logits as the cross-entropy kernels take them: `x`, the input itself where it has a
// classes-last rows view, else the input made contiguous; and `rows`, the rows view of x, if any
// (a contiguous x has one where C = 1 or d1 ... dk = 1).
struct CeLogits {
  at::Tensor x, rows;
};

inline CeLogits ce_logits(const at::Tensor& input) {
  at::Tensor rows = classes_last_rows(input);
  if (rows.defined()) return {input, rows};
  at::Tensor x = input.contiguous();
  return {x, classes_last_rows(x)};
}

// What the kernels read and its (N, C, P) view: the rows view (N * P rows, P = 1) where there is
// one, else the contiguous logits.
inline std::pair<at::Tensor, CeShape> ce_kernel_view(const at::Tensor& input, CeShape s) {
  CeLogits l = ce_logits(input);
  if (!l.rows.defined()) return {l.x, std::move(s)};
  s.N *= s.P;
  s.P = 1;
  return {l.rows, std::move(s)};
}

// The gradient of `input` from `rows`, the (N * P, C) gradient of its classes-last rows view: the
// input's own layout, as a view.
inline at::Tensor rows_as_input_layout(const at::Tensor& rows, const at::Tensor& input) {
  const std::vector<int64_t> order = classes_last_order(input.dim());
  std::vector<int64_t> back(input.dim());  // the inverse of order
  for (int64_t i = 0; i < input.dim(); ++i) back[order[i]] = i;
  return rows.view(input.permute(order).sizes()).permute(back);
}

// Cross-entropy with probability targets: the input viewed as (N, C, P) (an unbatched (C,) input
// is N = P = 1), the target of the same shape, the shape of the unreduced loss.
inline CeShape ce_prob_shape(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK(input.dim() >= 1, "fused_wloss.cross_entropy: input must have at least 1 dimension, got ",
              input.dim());
  TORCH_CHECK(target.sizes() == input.sizes(), "fused_wloss.cross_entropy: probability targets must have "
              "the input's shape ", input.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == input.scalar_type() ||
                  (target.scalar_type() == at::kFloat && acc_dtype(input.scalar_type()) == at::kFloat),
              "fused_wloss.cross_entropy: probability targets must have the input's dtype ", input.scalar_type(),
              " (or float32 with float16/bfloat16 input), got ", target.scalar_type());
  if (input.dim() == 1) return {1, input.size(0), 1, {}};
  std::vector<int64_t> loss_shape{input.size(0)};
  int64_t P = 1;
  for (int64_t d = 2; d < input.dim(); ++d) {
    loss_shape.push_back(input.size(d));
    P *= input.size(d);
  }
  return {input.size(0), input.size(1), P, std::move(loss_shape)};
}

// What the probability-target kernels read: classes-last logits (see classes_last_rows) in place as
// (N * P) rows of C, with the targets as rows in the same order (their own rows view where they
// are classes-last too, else one permuted copy, no larger than the copy of the logits it saves);
// any other logits and targets contiguous, as (N, C, P).
struct CeProbOperands {
  at::Tensor x, t;
  CeShape s;
};

inline CeProbOperands ce_prob_kernel_view(const at::Tensor& input, const at::Tensor& target, CeShape s) {
  const at::Tensor rows = classes_last_rows(input);
  if (!rows.defined()) return {input.contiguous(), target.contiguous(), std::move(s)};
  at::Tensor t_rows = classes_last_rows(target);
  if (!t_rows.defined()) t_rows = target.permute(classes_last_order(target.dim())).contiguous().view({-1, s.C});
  s.N *= s.P;
  s.P = 1;
  return {rows, t_rows, std::move(s)};
}

// The gradient the kernels wrote for ce_prob_kernel_view's x (rows, or contiguous) in the layout
// of `input`: a view of the rows in the logits' own classes-last layout.
inline at::Tensor ce_prob_grad_as_input(const at::Tensor& grad, const at::Tensor& input) {
  return classes_last_rows(input).defined() ? rows_as_input_layout(grad, input) : grad;
}

// The class weights of a cross-entropy call with probability targets, acc_t[C] (undefined without
// any): the static weight times the dynamic weight of each class's soft count sum_i q[i, c] (over
// samples and positions), the schemes of scheme_weight (a count below 0 counts as 0). ATen
// operations on the target's device: no host synchronisation.
inline at::Tensor ce_prob_class_weights(const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                                        int64_t C, int64_t scheme, double smoothing, double beta,
                                        at::ScalarType acc) {
  const bool has_weight = weight.has_value() && weight->defined();
  if (!has_weight && scheme == kNoScheme) return at::Tensor();
  at::Tensor class_w = has_weight ? as_acc(weight, acc, "weight", C).clone() : at::Tensor();
  if (scheme == kNoScheme) return class_w;
  std::vector<int64_t> dims;
  if (target.dim() > 1) {
    dims.push_back(0);
    for (int64_t d = 2; d < target.dim(); ++d) dims.push_back(d);
  }
  const at::Tensor counts =
      (dims.empty() ? target.to(at::kDouble) : target.sum(dims, false, at::kDouble)).clamp_min(0.0);
  at::Tensor dyn;
  if (scheme == kInverse) {
    dyn = (counts + smoothing).reciprocal();
  } else if (scheme == kInverseSqrt) {
    dyn = (counts + smoothing).rsqrt();
  } else {
    TORCH_CHECK(scheme == kEffectiveNumber, "fused_wloss: bad weighting scheme code ", scheme);
    const double log_beta = beta > 0.0 ? std::log(beta) : -std::numeric_limits<double>::infinity();
    dyn = (1.0 - beta) / (counts.clamp_min(1.0) * log_beta).expm1().neg();
  }
  dyn = dyn.to(acc);
  return class_w.defined() ? class_w.mul_(dyn) : dyn.contiguous();
}

[[noreturn]] inline void throw_bad_target(int64_t row, int64_t value, int64_t C, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, "cross_entropy: target must hold class indices in [0, ", C,
                    ") or ignore_index=", ignore_index, ", found ", value, " at element ", row);
}

struct BceShape {
  int64_t rows, L;
};

inline BceShape bce_shape(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK(target.sizes() == input.sizes(), "fused_wloss.binary_cross_entropy_with_logits: "
              "target must have the input's shape ", input.sizes(), ", got ", target.sizes());
  // float32 targets with float16/bfloat16 logits (the usual mixed-precision call: logits from an
  // autocast model, targets from the data loader) are read as they are
  TORCH_CHECK(target.scalar_type() == input.scalar_type() ||
                  (target.scalar_type() == at::kFloat && acc_dtype(input.scalar_type()) == at::kFloat),
              "fused_wloss.binary_cross_entropy_with_logits: target must have the input's dtype ",
              input.scalar_type(), " (or float32 with float16/bfloat16 input), got ", target.scalar_type());
  if (input.dim() < 2) return {input.numel(), 1};
  return {c10::multiply_integers(input.sizes().slice(0, input.dim() - 1)), input.size(-1)};
}

// A weight broadcastable to the input, as a per-label vector (L) when it is constant along every
// dimension but the last, else as a full contiguous (rows * L) array.
struct BceWeight {
  at::Tensor label;  // acc_t[L] or undefined
  at::Tensor full;   // acc_t[rows * L] or undefined
};

inline BceWeight classify_weight(const c10::optional<at::Tensor>& w, const at::Tensor& input,
                          int64_t L, at::ScalarType acc, const char* name) {
  BceWeight out;
  if (!w.has_value() || !w->defined()) return out;
  TORCH_CHECK(w->is_floating_point(), "fused_wloss: ", name, " must be floating point");
  const bool per_label = w->numel() == 1 ||
                         (input.dim() >= 2 && w->dim() >= 1 && w->size(-1) == L && w->numel() == L);
  if (per_label) {
    out.label = w->to(acc).reshape({-1}).expand({L}).contiguous();
  } else {
    out.full = w->to(acc).expand(input.sizes()).contiguous().reshape({-1});
  }
  return out;
}

// The per-label weights of the negative and the positive part of BCE: the per-label static weight,
// the per-label pos_weight and the dynamic weights (each of 0 or L elements) folded together;
// undefined where they are all 1.
inline std::pair<at::Tensor, at::Tensor> fold_bce_label_weights(const BceWeight& w, const BceWeight& pw,
                                                                const at::Tensor& neg_dyn,
                                                                const at::Tensor& pos_dyn, int64_t L,
                                                                at::ScalarType acc) {
  TORCH_CHECK(neg_dyn.numel() == 0 || neg_dyn.numel() == L, "fused_wloss: neg_label_weight must "
              "have 0 or ", L, " elements, got ", neg_dyn.numel());
  TORCH_CHECK(pos_dyn.numel() == 0 || pos_dyn.numel() == L, "fused_wloss: pos_label_weight must "
              "have 0 or ", L, " elements, got ", pos_dyn.numel());
  auto mul = [](const at::Tensor& a, const at::Tensor& b) {
    return !a.defined() ? b : (!b.defined() ? a : a * b);
  };
  const at::Tensor nd = neg_dyn.numel() > 0 ? neg_dyn.to(acc) : at::Tensor();
  const at::Tensor pd = pos_dyn.numel() > 0 ? pos_dyn.to(acc) : at::Tensor();
  return {mul(w.label, nd), mul(mul(w.label, pw.label), pd)};
}

// What the CPU and the CUDA BCE operators both read: contiguous input and target, the weights
// that vary per element (undefined where absent), the sample weight per row, and the folded
// per-label weights of the negative and the positive part (contiguous, undefined where all 1).
struct BceInputs {
  BceShape shape;
  at::Tensor x, t, neg_label, pos_label, elem_w, elem_pos_w, sw;
};

inline BceInputs bce_inputs(const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight,
                            const at::Tensor& neg_dyn, const at::Tensor& pos_dyn) {
  BceInputs b;
  b.shape = bce_shape(input, target);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const int64_t L = b.shape.L;
  b.x = input.contiguous();
  b.t = target.contiguous();
  const BceWeight w = classify_weight(weight, input, L, acc, "weight");
  const BceWeight pw = classify_weight(pos_weight, input, L, acc, "pos_weight");
  b.elem_w = w.full;
  b.elem_pos_w = pw.full;
  b.sw = as_acc(sample_weight, acc, "sample_weight", b.shape.rows);
  std::tie(b.neg_label, b.pos_label) = fold_bce_label_weights(w, pw, neg_dyn, pos_dyn, L, acc);
  if (b.neg_label.defined()) b.neg_label = b.neg_label.contiguous();
  if (b.pos_label.defined()) b.pos_label = b.pos_label.contiguous();
  return b;
}

}  // namespace fused_wloss
