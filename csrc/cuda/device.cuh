// What the CUDA kernels of fused_wloss use beyond the shared math: the one launch helper, the
// thread-cooperation primitives (group and block reductions built on shuffles, shared memory and
// __syncthreads), aligned vector loads, and the device-side assertion.
//
// Everything here compiles two ways: with nvcc for the GPU, and with g++ under the emulation layer
// csrc/emu/cuda_emu.h (FWL_EMULATE_CUDA), which runs the same kernels with the same launch
// configuration on the CPU for the test suite. Kernels therefore use only these primitives for
// cooperation: no CUB, no cooperative groups.
#pragma once

#if defined(FWL_EMULATE_CUDA)
#include <c10/util/Exception.h>

#include "../emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../fused_wloss_math.h"

namespace fused_wloss {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- launching -------------------------------------------------------------------------------

// Every kernel goes through here: on the GPU a launch on `stream` followed by the launch check, in
// the emulation the same grid, block and shared memory on the CPU.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Args... args) {
#if defined(FWL_EMULATE_CUDA)
  (void)stream;
  try {
    ::fwl_emu::launch(grid, block, smem_bytes, [&] { kernel(static_cast<Params>(args)...); });
  } catch (const ::fwl_emu::Error& e) {
    TORCH_CHECK(false, e.what());
  }
#else
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<Params>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// A grid of `blocks` x `rows` blocks, checked before the cast: gridDim.x is unsigned and holds at
// most 2^31 - 1 blocks, gridDim.y at most 65535; a larger or empty grid is a host error, not a
// wrapped launch.
inline dim3 grid_of(int64_t blocks, int64_t rows = 1) {
  TORCH_CHECK(blocks >= 1 && blocks <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()),
              "fused_wloss: a launch of ", blocks, " blocks (a grid holds 1 to 2^31 - 1)");
  TORCH_CHECK(rows >= 1 && rows <= 65535, "fused_wloss: a launch of ", rows, " rows of blocks (a grid holds 1 to 65535)");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(rows));
}

// A failed device-side check stops the kernel, as torch's own index checks do: on the GPU the
// next CUDA call reports "device-side assert triggered"; in the emulation the launch throws.
#if defined(FWL_EMULATE_CUDA)
#define FWL_KERNEL_ASSERT(cond, msg) FWL_EMU_DEVICE_ASSERT(cond, msg)
#else
#define FWL_KERNEL_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#endif

// Shared memory: FWL_SHARED a static array, FWL_DYNAMIC_SHARED the launch's smem_bytes as an array
// of `type` (the emulation poisons both at every block: csrc/emu/cuda_emu.h).
#if !defined(FWL_EMULATE_CUDA)
#define FWL_SHARED(type, name, count) __shared__ type name[count]
#define FWL_DYNAMIC_SHARED(type, name)                               \
  extern __shared__ __align__(16) unsigned char fwl_dynamic_smem[]; \
  type* name = reinterpret_cast<type*>(fwl_dynamic_smem)
#endif

// ---- types ------------------------------------------------------------------------------------

template <typename T>
using acc_t_of = std::conditional_t<std::is_same<T, double>::value, double, float>;

template <typename T>
__device__ __forceinline__ acc_t_of<T> to_acc(T v) {
  return static_cast<acc_t_of<T>>(v);
}

// 16 bytes of T, loaded and stored as one vector where the address is aligned.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Through uint4, so that nvcc emits one 128-bit access (a Pack of c10::Half or c10::BFloat16
// copied as a struct becomes eight 16-bit stores).
// The emulation checks what the GPU would fault on (a misaligned address); on the GPU no check.
#if defined(FWL_EMULATE_CUDA)
#define FWL_CHECK_PACK_ALIGNED(p) \
  FWL_EMU_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(p) % 16 == 0, "misaligned 16-byte vector access")
#else
#define FWL_CHECK_PACK_ALIGNED(p)
#endif

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  FWL_CHECK_PACK_ALIGNED(p);
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  Pack<T> v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
  FWL_CHECK_PACK_ALIGNED(p);
  uint4 u;
  memcpy(&u, &v, sizeof(u));
  *reinterpret_cast<uint4*>(p) = u;
}

// V neighbouring elements of a strided walk (the pixels of one class): one element (V = 1), or
// one 16-byte Pack (V = Pack<T>::kSize, p aligned).
template <int V, typename T>
struct PixelVec {
  static_assert(V == 1 || V == Pack<T>::kSize, "one element or one 16-byte vector");
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ PixelVec<V, T> load_pixels(const T* p) {
  PixelVec<V, T> out;
  if constexpr (V == 1) {
    out.v[0] = *p;
  } else {
    const Pack<T> k = load_pack(p);
#pragma unroll
    for (int q = 0; q < V; ++q) out.v[q] = k.v[q];
  }
  return out;
}

template <int V, typename T>
__device__ __forceinline__ void store_pixels(T* p, const PixelVec<V, T>& v) {
  if constexpr (V == 1) {
    *p = v.v[0];
  } else {
    Pack<T> k;
#pragma unroll
    for (int q = 0; q < V; ++q) k.v[q] = v.v[q];
    store_pack(p, k);
  }
}

// exp in acc_t through exp2 (one multiply and the hardware's exp2 on the GPU)
__device__ __forceinline__ float exp_acc(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// ---- thread cooperation --------------------------------------------------------------------

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// All-reduce over aligned groups of `width` lanes (a power of two <= 32) by xor butterflies: every
// lane of a group ends with the same, bitwise identical value, in an order fixed by the width.
// Every lane of the warp must call it.
template <typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, int width, Op op) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(kFullMask, v, offset, width));
  }
  return v;
}

// The maximum of two values, NaN if either is NaN (a NaN logit makes its row's loss NaN).
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return (a > b || a != a) ? a : b; }
};

// The row state of the online softmax (see RowStats in the shared math), all-reduced over a group
// of lanes in two phases: the maximum first (a state's max is never NaN), then each lane refers its
// state to it once, and the sums add, with the label-smoothing sums only when `smooth` (uniform
// over the group; without it they are 0 everywhere). Per xor step two shuffles and two additions
// where combining whole states took four shuffles and an exponential.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> group_allreduce_stats(RowStats<acc_t> s, int width, bool smooth) {
  s = row_stats_rebase(s, group_allreduce(s.max, width, MaxOp{}));
  s.sum = group_allreduce(s.sum, width, SumOp{});
  if (smooth) {
    s.wdiff = group_allreduce(s.wdiff, width, SumOp{});
    s.wsum = group_allreduce(s.wsum, width, SumOp{});
  }
  return s;
}

// All-reduce over the whole block (blockDim.x a multiple of 32, at most 1024 threads): warps
// reduce, warp 0 reduces the warp results in warp order, everyone reads the result. `scratch`
// holds 32 values of shared memory. Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> block_allreduce_stats(RowStats<acc_t> s, RowStats<acc_t>* scratch,
                                                                  bool smooth) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  s = group_allreduce_stats(s, kWarpSize, smooth);
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (warp == 0) {
    RowStats<acc_t> w = lane < warps ? scratch[lane] : RowStats<acc_t>::empty();
    w = group_allreduce_stats(w, kWarpSize, smooth);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const RowStats<acc_t> out = scratch[0];
  __syncthreads();  // scratch may be reused by the caller
  return out;
}


// All-reduce with `op` over the whole block, as block_allreduce_sum below (`identity` fills the
// lanes past the last warp).
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, T* scratch, Op op, T identity) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = group_allreduce(v, kWarpSize, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : identity;
    w = group_allreduce(w, kWarpSize, op);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const T out = scratch[0];
  __syncthreads();
  return out;
}

template <typename T>
__device__ __forceinline__ T block_allreduce_sum(T v, T* scratch) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = group_allreduce(v, kWarpSize, SumOp{});
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : T(0);
    w = group_allreduce(w, kWarpSize, SumOp{});
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const T out = scratch[0];
  __syncthreads();
  return out;
}

}  // namespace cuda
}  // namespace fused_wloss
