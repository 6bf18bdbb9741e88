// The fused_wloss operators: schemas registered with the PyTorch dispatcher, and the Python module
// fused_wloss._C that loads them. Schemas: csrc/schemas.h. Implementations: csrc/cpu/losses_cpu.cpp
// (CPU) and csrc/cuda/losses_cuda.cu (CUDA, in builds with FWL_WITH_CUDA). Autograd, fake (meta)
// kernels and the Python wrappers: fused_wloss/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernel_table.h"
#include "schemas.h"

namespace fused_wloss {
namespace cpu {
void set_kernel_table(const KernelTable* table);
const KernelTable* kernel_table_or_null();
void empty_cpu_cache();
}  // namespace cpu
}  // namespace fused_wloss

TORCH_LIBRARY(fused_wloss, m) {
  m.def(FWL_SCHEMA_CE_FORWARD);
  m.def(FWL_SCHEMA_CE_BACKWARD);
  m.def(FWL_SCHEMA_CE_GRAD_INPLACE);
  m.def(FWL_SCHEMA_CE_PROB_FORWARD);
  m.def(FWL_SCHEMA_CE_PROB_BACKWARD);
  m.def(FWL_SCHEMA_BCE_FORWARD);
  m.def(FWL_SCHEMA_BCE_BACKWARD);
}

// ---- the Python module: install the CPU kernel table of one instruction set ----------------------

static PyObject* set_cpu_kernels(PyObject*, PyObject* capsule) {
  void* table = PyCapsule_GetPointer(capsule, FWL_KERNEL_TABLE_CAPSULE);
  if (table == nullptr) return nullptr;  // PyCapsule_GetPointer set a TypeError/ValueError
  fused_wloss::cpu::set_kernel_table(static_cast<const fused_wloss::cpu::KernelTable*>(table));
  Py_RETURN_NONE;
}

static PyObject* cpu_kernels_isa(PyObject*, PyObject*) {
  const fused_wloss::cpu::KernelTable* t = fused_wloss::cpu::kernel_table_or_null();
  if (t == nullptr) Py_RETURN_NONE;
  return PyUnicode_FromString(t->isa);
}

static PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  fused_wloss::cpu::empty_cpu_cache();
  Py_RETURN_NONE;
}

static PyObject* has_cuda_kernels(PyObject*, PyObject*) {
#if defined(FWL_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef fwl_methods[] = {
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS,
     "Whether this build registered CUDA implementations of the operators."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS,
     "Return the gradient blocks cached for reuse (see FUSED_WLOSS_CPU_CACHE_MB) to the system."},
    {"set_cpu_kernels", set_cpu_kernels, METH_O,
     "Install the CPU kernels of a fused_wloss._cpu_<isa> module (its kernel_table capsule)."},
    {"cpu_kernels_isa", cpu_kernels_isa, METH_NOARGS,
     "The instruction set of the installed CPU kernels, or None."},
    {nullptr, nullptr, 0, nullptr}};

#define FWL_STR2(x) #x
#define FWL_STR(x) FWL_STR2(x)
#define FWL_CONCAT2(a, b) a##b
#define FWL_CONCAT(a, b) FWL_CONCAT2(a, b)

static PyModuleDef fwl_module = {PyModuleDef_HEAD_INIT, FWL_STR(TORCH_EXTENSION_NAME),
                                 "fused_wloss operators (registered with torch.ops.fused_wloss)",
                                 -1, fwl_methods};

PyMODINIT_FUNC FWL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fwl_module); }
