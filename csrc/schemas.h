// The schemas of the fused_wloss operators, in one place: registered by csrc/ops.cpp for
// torch.ops.fused_wloss and, under the same text, by the test-only emulation module
// (csrc/emu/losses_emu.cpp) for torch.ops.fused_wloss_emu.
//
// One forward/backward pair per loss, with the options as arguments:
//   reduction: 0 none, 1 sum, 2 mean, 3 sample_mean
//   scheme:    0 no dynamic weights, 1 inverse, 2 inverse_sqrt, 3 effective_number
//   gamma:     focal-loss focusing (0: plain cross-entropy); alpha: torchvision's sigmoid focal
//              alpha (negative: none)
//   loss_dtype: the dtype of the returned loss: None for the input's, or the accumulation dtype
//              (float32 for float16/bfloat16 inputs), which the Python layer asks for under
//              torch.autocast, as torch's own losses return float32 there. The loss is then
//              written from the float32 accumulators, never rounded through the input's dtype.
#pragma once

// Returns the loss, the per-element log-sum-exp as two parts in the accumulation dtype, shape
// (2, elements), lse = hi + lo (split_lse in fused_wloss_math.h: exact for logits of any size),
// the class weights applied (static x dynamic; empty when there are
// none) and the normaliser of the reduction.
#define FWL_SCHEMA_CE_FORWARD \
  "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, Tensor? sample_weight, " \
  "int ignore_index, float label_smoothing, int reduction, int scheme, float smoothing, " \
  "float beta, float gamma=0., ScalarType? loss_dtype=None) -> (Tensor loss, Tensor lse, Tensor class_weight, Tensor norm)"
#define FWL_SCHEMA_CE_BACKWARD \
  "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor class_weight, " \
  "Tensor? sample_weight, Tensor lse, Tensor norm, int ignore_index, float label_smoothing, " \
  "int reduction, float gamma=0.) -> Tensor"
// The same gradient written over the logits themselves (2-D input, contiguous): for callers that
// own the logits and need them no more, as the fused linear cross-entropy's chunks. Returns input.
#define FWL_SCHEMA_CE_GRAD_INPLACE \
  "cross_entropy_grad_(Tensor(a!) input, Tensor grad_loss, Tensor target, Tensor class_weight, " \
  "Tensor? sample_weight, Tensor lse, Tensor norm, int ignore_index, float label_smoothing, " \
  "int reduction, float gamma=0.) -> Tensor(a!)"
// Cross-entropy with probability (soft) targets of the input's shape. Returns the loss, the
// per-element statistics the backward reads, shape (3, elements) in the accumulation dtype: the lse
// as hi and lo (split_lse) and B = sum_c W_c q'_c, the weight of the element's probabilities, the
// class weights applied (empty when there are none) and the normaliser.
#define FWL_SCHEMA_CE_PROB_FORWARD \
  "cross_entropy_prob_forward(Tensor input, Tensor target, Tensor? weight, Tensor? sample_weight, " \
  "float label_smoothing, int reduction, int scheme, float smoothing, float beta, " \
  "ScalarType? loss_dtype=None) -> (Tensor loss, Tensor stats, Tensor class_weight, Tensor norm)"
#define FWL_SCHEMA_CE_PROB_BACKWARD \
  "cross_entropy_prob_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor class_weight, " \
  "Tensor? sample_weight, Tensor stats, Tensor norm, float label_smoothing, int reduction) -> Tensor"
// Returns the loss and the dynamic per-label weights of the negative and the positive part
// (empty without dynamic weighting).
#define FWL_SCHEMA_BCE_FORWARD \
  "bce_forward(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, " \
  "Tensor? sample_weight, int reduction, int scheme, float smoothing, float beta, " \
  "bool balanced, float gamma=0., float alpha=-1., ScalarType? loss_dtype=None) -> (Tensor loss, Tensor neg_label_weight, " \
  "Tensor pos_label_weight)"
#define FWL_SCHEMA_BCE_BACKWARD \
  "bce_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, " \
  "Tensor? pos_weight, Tensor? sample_weight, Tensor neg_label_weight, " \
  "Tensor pos_label_weight, int reduction, float gamma=0., float alpha=-1.) -> Tensor"
