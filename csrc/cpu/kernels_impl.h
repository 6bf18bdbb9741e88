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
//
// The kernels themselves are in vec_math.h (shared vector helpers), ce_forward.h, ce_backward.h,
// ce_prob.h (probability targets) and bce.h; this file assembles them into the module's KernelTable.
#pragma once

#include <Python.h>

#include "bce.h"
#include "ce_backward.h"
#include "ce_forward.h"
#include "ce_prob.h"
#include "kernel_table.h"

namespace fused_wloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

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
      {&ce_prob_forward_chunk<float>, &ce_prob_forward_chunk<double>, &ce_prob_forward_chunk<c10::Half>,
       &ce_prob_forward_chunk<c10::BFloat16>},
      {&ce_prob_backward_chunk<float>, &ce_prob_backward_chunk<double>, &ce_prob_backward_chunk<c10::Half>,
       &ce_prob_backward_chunk<c10::BFloat16>},
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
