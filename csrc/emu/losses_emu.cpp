// fused_wloss._cuda_emu: the CUDA operators run on the CPU under the emulation layer, for the
// test suite only (users never load it). The host code and kernels are those of csrc/cuda,
// compiled by g++ with FWL_EMULATE_CUDA; the operators take CPU tensors and are registered as
// torch.ops.fused_wloss_emu.* with the schemas of torch.ops.fused_wloss.
//
// torch.ops.fused_wloss_emu.selftest(name, threads, blocks) runs one of the small kernels below,
// each with a result known in closed form, so the tests can check every primitive of the layer,
// and the ones whose misuse the layer must report.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "../cuda/losses_host.h"
#include "../schemas.h"

namespace fused_wloss {
namespace emu_selftest {

using cuda::kFullMask;

// out[thread] = the xor-butterfly sum over aligned groups of `width` lanes of the lane numbers
__global__ void group_sum_kernel(int64_t* out, int width) {
  const int lane = threadIdx.x % warpSize;
  const int64_t v = cuda::group_allreduce(static_cast<int64_t>(lane), width, cuda::SumOp{});
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// out[thread] = value of lane + 1 (shfl_down), lane - 1 (shfl_up), lane 3 (shfl), ballot bits
__global__ void shuffles_kernel(int64_t* out) {
  const int lane = threadIdx.x % warpSize;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  out[base + 0] = __shfl_down_sync(kFullMask, lane * 10, 1);
  out[base + 1] = __shfl_up_sync(kFullMask, lane * 10, 1);
  out[base + 2] = __shfl_sync(kFullMask, lane * 10, 3);
  out[base + 3] = static_cast<int64_t>(__ballot_sync(kFullMask, lane % 3 == 0));
}

// Divergent halves of a warp, each shuffling among its own 16 lanes with its own mask.
__global__ void divergent_halves_kernel(int64_t* out) {
  const int lane = threadIdx.x % warpSize;
  int64_t v;
  if (lane < 16) {
    v = __shfl_xor_sync(0x0000ffffu, lane, 1);
  } else {
    v = __shfl_xor_sync(0xffff0000u, lane + 100, 2);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Shared memory and __syncthreads: each thread reads what the mirrored thread wrote.
__global__ void reverse_kernel(int64_t* out) {
  FWL_SHARED(int64_t, buf, 1024);
  buf[threadIdx.x] = static_cast<int64_t>(blockIdx.x) * 1000 + threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// Dynamic shared memory: the same through FWL_DYNAMIC_SHARED.
__global__ void dynamic_reverse_kernel(int64_t* out) {
  FWL_DYNAMIC_SHARED(int64_t, buf);
  buf[threadIdx.x] = static_cast<int64_t>(threadIdx.x) * 7;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// block_allreduce_sum of thread numbers, written by every thread.
__global__ void block_sum_kernel(int64_t* out) {
  FWL_SHARED(int64_t, scratch, 32);
  const int64_t v = cuda::block_allreduce_sum(static_cast<int64_t>(threadIdx.x), scratch);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// block_allreduce_sum twice on the same scratch: its trailing barrier keeps the second call from
// overwriting what the first has not read yet.
__global__ void scratch_reuse_kernel(int64_t* out) {
  FWL_SHARED(int64_t, scratch, 32);
  const int64_t first = cuda::block_allreduce_sum(static_cast<int64_t>(threadIdx.x), scratch);
  const int64_t second = cuda::block_allreduce_sum(int64_t(1), scratch);
  out[blockIdx.x * blockDim.x + threadIdx.x] = first * 10000 + second;
}

// The same without that barrier: a race on a GPU, which the warp-ahead schedule must expose as a
// wrong result in some warp.
__device__ int64_t block_sum_without_trailing_barrier(int64_t v, int64_t* scratch) {
  const int warp = threadIdx.x / warpSize, lane = threadIdx.x % warpSize;
  const int warps = blockDim.x / warpSize;
  v = cuda::group_allreduce(v, warpSize, cuda::SumOp{});
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < warps ? scratch[lane] : 0;
    w = cuda::group_allreduce(w, warpSize, cuda::SumOp{});
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

__global__ void racy_scratch_reuse_kernel(int64_t* out) {
  FWL_SHARED(int64_t, scratch, 32);
  const int64_t first = block_sum_without_trailing_barrier(static_cast<int64_t>(threadIdx.x), scratch);
  const int64_t second = block_sum_without_trailing_barrier(int64_t(1), scratch);
  out[blockIdx.x * blockDim.x + threadIdx.x] = first * 10000 + second;
}

// Every thread of every block adds its block number + 1 to one counter.
__global__ void atomics_kernel(int64_t* out) {
  atomicAdd(reinterpret_cast<unsigned long long*>(out), static_cast<unsigned long long>(blockIdx.x + 1));
}

// Misuse: thread 0 returns before a barrier the others wait at.
__global__ void missing_barrier_kernel(int64_t* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Misuse: lane 5 calls a shuffle whose mask leaves it out.
__global__ void mask_without_caller_kernel(int64_t* out) {
  const int lane = threadIdx.x % warpSize;
  const unsigned mask = lane == 5 ? 0xffffffdfu : kFullMask;
  out[threadIdx.x] = __shfl_xor_sync(mask, lane, 1);
}

// Misuse: the mask names all lanes, but lane 31 never takes part.
__global__ void missing_lane_kernel(int64_t* out) {
  const int lane = threadIdx.x % warpSize;
  if (lane == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, lane, 1);
}

// Misuse: a shuffle reads a lane outside its mask (lane 0 reads lane 1, mask holds lane 0 only).
__global__ void read_outside_mask_kernel(int64_t* out) {
  const int lane = threadIdx.x % warpSize;
  if (lane == 0) out[0] = __shfl_xor_sync(0x1u, lane, 1);
}

__global__ void device_assert_kernel(int64_t* out) {
  FWL_KERNEL_ASSERT(threadIdx.x != 3, "thread 3 may not pass");
  out[threadIdx.x] = 1;
}

// Misuse: a 16-byte vector load from an address 8 bytes past an aligned one.
__global__ void misaligned_pack_kernel(int64_t* out) {
  alignas(16) float buf[8] = {};
  const cuda::Pack<float> v = cuda::load_pack(buf + 2);
  out[threadIdx.x] = static_cast<int64_t>(v.v[0]);
}

// Static shared memory read before this block writes it: on a GPU it holds whatever an earlier
// block (or kernel) left; the emulation fills it with 0xFF bytes per block, so out = -1.
__global__ void stale_shared_kernel(int64_t* out) {
  FWL_SHARED(int64_t, last, 1);
  if (threadIdx.x == 0) out[blockIdx.x * blockDim.x] = last[0];
  __syncthreads();
  if (threadIdx.x == 0) last[0] = blockIdx.x + 1;
}

// The block index of every block, in the order the blocks ran: out[k] = block run k-th.
__global__ void block_order_kernel(int64_t* out) {
  if (threadIdx.x == 0) {
    const unsigned long long k = atomicAdd(reinterpret_cast<unsigned long long*>(out), 1ull);
    out[1 + k] = blockIdx.x;
  }
}

at::Tensor selftest(const std::string& name, int64_t threads, int64_t blocks) {
  TORCH_CHECK(threads > 0 && threads <= 1024 && blocks > 0, "selftest: bad launch ", threads, "x", blocks);
  const int64_t n = threads * blocks;
  at::Tensor out = at::zeros({name == "shuffles" ? 4 * n : name == "block_order" ? blocks + 1 : n}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  const dim3 g(static_cast<unsigned>(blocks)), b(static_cast<unsigned>(threads));
  using cuda::launch_kernel;
  if (name.rfind("group_sum_", 0) == 0) {
    launch_kernel(group_sum_kernel, g, b, 0, nullptr, p, std::stoi(name.substr(10)));
  } else if (name == "shuffles") {
    launch_kernel(shuffles_kernel, g, b, 0, nullptr, p);
  } else if (name == "divergent_halves") {
    launch_kernel(divergent_halves_kernel, g, b, 0, nullptr, p);
  } else if (name == "reverse") {
    launch_kernel(reverse_kernel, g, b, 0, nullptr, p);
  } else if (name == "dynamic_reverse") {
    launch_kernel(dynamic_reverse_kernel, g, b, threads * sizeof(int64_t), nullptr, p);
  } else if (name == "block_sum") {
    launch_kernel(block_sum_kernel, g, b, 0, nullptr, p);
  } else if (name == "scratch_reuse") {
    launch_kernel(scratch_reuse_kernel, g, b, 0, nullptr, p);
  } else if (name == "racy_scratch_reuse") {
    launch_kernel(racy_scratch_reuse_kernel, g, b, 0, nullptr, p);
  } else if (name == "atomics") {
    launch_kernel(atomics_kernel, g, b, 0, nullptr, p);
  } else if (name == "missing_barrier") {
    launch_kernel(missing_barrier_kernel, g, b, 0, nullptr, p);
  } else if (name == "mask_without_caller") {
    launch_kernel(mask_without_caller_kernel, g, b, 0, nullptr, p);
  } else if (name == "missing_lane") {
    launch_kernel(missing_lane_kernel, g, b, 0, nullptr, p);
  } else if (name == "read_outside_mask") {
    launch_kernel(read_outside_mask_kernel, g, b, 0, nullptr, p);
  } else if (name == "misaligned_pack") {
    launch_kernel(misaligned_pack_kernel, g, b, 0, nullptr, p);
  } else if (name == "dynamic_smem_over_48k") {
    launch_kernel(dynamic_reverse_kernel, g, b, 48 * 1024 + 16, nullptr, p);
  } else if (name == "stale_shared") {
    launch_kernel(stale_shared_kernel, g, b, 0, nullptr, p);
  } else if (name == "block_order") {
    launch_kernel(block_order_kernel, g, b, 0, nullptr, p);
  } else if (name == "device_assert") {
    launch_kernel(device_assert_kernel, g, b, 0, nullptr, p);
  } else {
    TORCH_CHECK(false, "selftest: no kernel named '", name, "'");
  }
  return out;
}

}  // namespace emu_selftest
}  // namespace fused_wloss

TORCH_LIBRARY(fused_wloss_emu, m) {
  m.def(FWL_SCHEMA_CE_FORWARD);
  m.def(FWL_SCHEMA_CE_BACKWARD);
  m.def(FWL_SCHEMA_CE_GRAD_INPLACE);
  m.def(FWL_SCHEMA_CE_PROB_FORWARD);
  m.def(FWL_SCHEMA_CE_PROB_BACKWARD);
  m.def(FWL_SCHEMA_BCE_FORWARD);
  m.def(FWL_SCHEMA_BCE_BACKWARD);
  m.def("selftest(str name, int threads, int blocks) -> Tensor", &fused_wloss::emu_selftest::selftest);
}

TORCH_LIBRARY_IMPL(fused_wloss_emu, CPU, m) {
  m.impl("cross_entropy_forward", &fused_wloss::cuda::host::cross_entropy_forward);
  m.impl("cross_entropy_backward", &fused_wloss::cuda::host::cross_entropy_backward);
  m.impl("cross_entropy_grad_", &fused_wloss::cuda::host::cross_entropy_grad_);
  m.impl("cross_entropy_prob_forward", &fused_wloss::cuda::host::cross_entropy_prob_forward);
  m.impl("cross_entropy_prob_backward", &fused_wloss::cuda::host::cross_entropy_prob_backward);
  m.impl("bce_forward", &fused_wloss::cuda::host::bce_forward);
  m.impl("bce_backward", &fused_wloss::cuda::host::bce_backward);
}

#define FWL_STR2(x) #x
#define FWL_STR(x) FWL_STR2(x)
#define FWL_CONCAT2(a, b) a##b
#define FWL_CONCAT(a, b) FWL_CONCAT2(a, b)

static PyModuleDef fwl_emu_module = {PyModuleDef_HEAD_INIT, FWL_STR(TORCH_EXTENSION_NAME),
                                     "fused_wloss CUDA kernels emulated on the CPU (tests only): "
                                     "torch.ops.fused_wloss_emu",
                                     -1, nullptr};

PyMODINIT_FUNC FWL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fwl_emu_module); }
