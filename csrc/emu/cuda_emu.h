// A small CUDA execution model for the CPU: under it the kernel sources of csrc/cuda compile as
// plain C++ with g++ and run on host threads, so that CI, which has no GPU, executes the kernels'
// own logic (indexing, reductions, synchronisation order, math).
//
// Model. A launch runs its blocks one after another on the calling thread. The threads of a block
// are fibers (ucontext) that the block scheduler runs in turn, each until it reaches a point
// where CUDA threads meet: __syncthreads, a warp shuffle or vote, or its end. One warp runs as far
// as it can before the next starts (warps in increasing order in even blocks, decreasing in odd
// ones), so a warp that races ahead and overwrites shared memory another warp has yet to read,
// for want of a barrier, changes the result. A meeting point is
// released only when every thread CUDA says takes part has arrived, with CUDA's semantics:
// - __syncthreads: every thread of the block. A thread that exits while others wait at a barrier
//   (a barrier in divergent code) is reported, as is a barrier some threads never reach.
// - __shfl_*_sync / __ballot_sync / __syncwarp: the lanes of the mask, which must include the
//   calling lane; every lane of the mask must arrive at a warp operation with the same mask, and
//   a shuffle may read only lanes of the mask. Anything else is reported.
// A report is a fwl_emu::Error thrown from the launch, naming the block, the thread and what
// went wrong; the fibers of the failed block are abandoned (kernels here keep only plain data on
// their stacks).
//
// What it does not model: timing, coalescing, caches, the memory consistency of a real GPU
// (fibers switch only at meeting points, so a race between threads of one warp, or one that the
// two warp orders above do not expose, goes unseen), independent thread scheduling inside a warp,
// and several blocks in flight at once.
// Blocks run in index order unless FWL_EMU_BLOCK_ORDER=shuffle (see block_order_seed); dynamic
// shared memory is limited to the 48 KB a kernel has without opting in; 16-byte vector accesses
// (load_pack / store_pack in device.cuh) must be 16-byte aligned, as on the GPU.
//
// Memory: static shared arrays (FWL_SHARED; a bare __shared__ does not compile here) are
// function-local statics per host thread (one block runs at a time per host thread, as on one SM
// with one resident block), and dynamic shared memory (FWL_DYNAMIC_SHARED) is a per-launch
// buffer. Both are filled with 0xFF bytes (NaN for floats, -1 for integers) at the start of every
// block, static arrays when a block first reaches their declaration: on a GPU a block's shared
// memory holds whatever an earlier block left there, so a read of shared memory the block did not
// write shows up in the results instead of passing on a value that only the emulator provides.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FWL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FWL_EMU_ASAN 1
#endif
#endif
#if defined(FWL_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

#define FWL_EMULATE_CUDA 1

// ---- qualifiers and built-in variables --------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Kernels declare shared memory with FWL_SHARED (static arrays) and FWL_DYNAMIC_SHARED (device.cuh
// spells both for nvcc), so that the emulation can poison it per block; a bare __shared__ would
// keep the previous block's contents, which no GPU promises.
#define __shared__ static_assert(false, "declare shared memory with FWL_SHARED(type, name, count)");
#define FWL_SHARED(type, name, count)                     \
  static thread_local type name##_fwl_storage[count];     \
  static thread_local uint64_t name##_fwl_block = 0;      \
  type(&name)[count] = ::fwl_emu::block_shared(name##_fwl_storage, name##_fwl_block)
#define FWL_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::fwl_emu::dynamic_shared())

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

using cudaStream_t = void*;

namespace fwl_emu {

constexpr int kWarpSize = 32;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class FiberState { Runnable, AtBarrier, AtWarp, Done };

// What a lane brings to a warp operation and takes back from it.
struct WarpSlot {
  unsigned mask = 0;
  int kind = 0;           // kShfl*, kBallot, kSyncWarp
  int src_arg = 0;        // laneMask / delta / srcLane
  int width = kWarpSize;
  uint64_t value = 0;     // the bits the lane offers (up to 8 bytes)
  int predicate = 0;
  uint64_t result = 0;
  int line = 0;
};

enum WarpKind { kShflXor = 1, kShflDown = 2, kShflUp = 3, kShflIdx = 4, kBallot = 5, kSyncWarp = 6 };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  FiberState state = FiberState::Runnable;
  uint3 tid{0, 0, 0};
  int linear = 0;
  int barrier_line = 0;
  WarpSlot slot;
};

class BlockScheduler;

// The per-host-thread execution context of the running kernel.
struct Context {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  BlockScheduler* sched = nullptr;
  Fiber* self = nullptr;
  std::vector<unsigned char> dynamic_smem;
  uint64_t block_serial = 0;  // of the running block, unique on this host thread (never 0)
};

inline Context& ctx() {
  static thread_local Context c;
  return c;
}

inline void* dynamic_shared() { return ctx().dynamic_smem.data(); }

// A static shared array (FWL_SHARED), filled with 0xFF bytes when the first thread of a block
// reaches its declaration (`seen` is the serial of the block that last did).
template <typename T, size_t N>
inline T (&block_shared(T (&storage)[N], uint64_t& seen))[N] {
  static_assert(std::is_trivially_copyable<T>::value, "shared memory holds plain data");
  if (seen != ctx().block_serial) {
    std::memset(static_cast<void*>(storage), 0xFF, sizeof(storage));
    seen = ctx().block_serial;
  }
  return storage;
}

class BlockScheduler {
 public:
  static constexpr size_t kStackBytes =
#if defined(FWL_EMU_ASAN)
      256 * 1024;
#else
      64 * 1024;
#endif

  explicit BlockScheduler(int nthreads) : fibers_(nthreads) {
    for (auto& f : fibers_) f.stack.reset(new char[kStackBytes]);
  }

  // Runs body() as every thread of the block; throws Error on misuse.
  //
  // Schedule: one warp at a time runs as far as it can, through its own warp operations, until
  // it waits at __syncthreads or ends; then the next warp. Warps go in increasing order in even
  // blocks and decreasing order in odd ones. Both are schedules a GPU may pick, and running a
  // warp ahead of the others is the adversarial one for shared memory: a warp that overwrites
  // what another has not read yet, for want of a barrier, changes the result.
  void run(const std::function<void()>& body, const dim3& block, bool reverse_warps = false) {
    body_ = &body;
    error_.clear();
    const int n = static_cast<int>(fibers_.size());
    for (int i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      f.state = FiberState::Runnable;
      f.linear = i;
      f.tid = {static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
               static_cast<unsigned>(i / (block.x * block.y))};
      f.slot = WarpSlot{};
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &main_;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&BlockScheduler::entry), 0);
    }
    const int warps = (n + kWarpSize - 1) / kWarpSize;
    for (;;) {
      for (int k = 0; k < warps; ++k) {
        const int w0 = (reverse_warps ? warps - 1 - k : k) * kWarpSize;
        const int w1 = std::min(n, w0 + kWarpSize);
        bool progress = true;
        while (progress) {
          for (int i = w0; i < w1; ++i) {
            if (fibers_[i].state == FiberState::Runnable) switch_to(fibers_[i]);
            if (!error_.empty()) throw Error(error_);
          }
          progress = release_warp(w0);
          if (!error_.empty()) throw Error(error_);
        }
      }
      if (std::all_of(fibers_.begin(), fibers_.end(),
                      [](const Fiber& f) { return f.state == FiberState::Done; })) {
        return;
      }
      const bool released = release_barrier();
      if (!error_.empty()) throw Error(error_);
      if (!released) throw Error(describe_stall());
    }
  }

  // Called from a fiber: wait at the block barrier.
  void barrier(int line) {
    Fiber* f = ctx().self;
    f->state = FiberState::AtBarrier;
    f->barrier_line = line;
    yield(f);
  }

  // Called from a fiber: take part in a warp operation; returns the lane's result.
  uint64_t warp_op(const WarpSlot& in) {
    Fiber* f = ctx().self;
    const int lane = f->linear % kWarpSize;
    if (!(in.mask >> lane & 1u)) {
      fail(f, "a warp operation (line " + std::to_string(in.line) + ") whose mask 0x" + hex(in.mask) +
                  " leaves out the calling lane " + std::to_string(lane));
    }
    f->slot = in;
    f->state = FiberState::AtWarp;
    yield(f);
    return f->slot.result;
  }

  // Called from a fiber: a device-side assertion failed; never returns.
  [[noreturn]] void device_assert(const char* msg, const char* file, int line) {
    Fiber* f = ctx().self;
    fail(f, std::string("device-side assertion failed: ") + msg + " (" + file + ":" +
                std::to_string(line) + ")");
    std::abort();  // unreachable: fail() never resumes the fiber
  }

  // Called from a fiber: a misuse found before the fiber reaches a meeting point; never returns.
  [[noreturn]] void misuse(const std::string& what) { fail(ctx().self, what); }

  int num_threads() const { return static_cast<int>(fibers_.size()); }

 private:
  static void entry() {
    BlockScheduler* s = ctx().sched;
    Fiber* f = ctx().self;
#if defined(FWL_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &s->main_stack_bottom_, &s->main_stack_size_);
#endif
    (*s->body_)();
    f->state = FiberState::Done;
#if defined(FWL_EMU_ASAN)
    __sanitizer_start_switch_fiber(nullptr, s->main_stack_bottom_, s->main_stack_size_);
#endif
    // returning resumes uc_link (main_)
  }

  void switch_to(Fiber& f) {
    ctx().self = &f;
#if defined(FWL_EMU_ASAN)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack.get(), kStackBytes);
#endif
    swapcontext(&main_, &f.ctx);
#if defined(FWL_EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    ctx().self = nullptr;
  }

  void yield(Fiber* f) {
#if defined(FWL_EMU_ASAN)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, main_stack_bottom_, main_stack_size_);
#endif
    swapcontext(&f->ctx, &main_);
#if defined(FWL_EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake, &main_stack_bottom_, &main_stack_size_);
#endif
  }

  [[noreturn]] void fail(Fiber* f, const std::string& what) {
    if (error_.empty()) {
      const Context& c = ctx();
      error_ = "fused_wloss CUDA emulation: block (" + std::to_string(c.block_idx.x) + "," +
               std::to_string(c.block_idx.y) + "," + std::to_string(c.block_idx.z) + ") thread (" +
               std::to_string(f->tid.x) + "," + std::to_string(f->tid.y) + "," +
               std::to_string(f->tid.z) + "): " + what;
    }
    f->state = FiberState::Done;
    yield(f);  // the scheduler throws and never resumes this fiber
    std::abort();
  }

  static std::string hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%08x", v);
    return buf;
  }

  static int src_lane(const WarpSlot& s, int lane) {
    const int w = s.width;
    const int seg = lane & ~(w - 1);
    switch (s.kind) {
      case kShflXor: {  // a group may read earlier groups, not later ones
        const int src = lane ^ (s.src_arg & (kWarpSize - 1));
        return src < seg + w ? src : lane;
      }
      case kShflDown: {
        const int src = lane + s.src_arg;
        return (src - seg) < w ? src : lane;
      }
      case kShflUp: {
        const int src = lane - s.src_arg;
        return src >= seg ? src : lane;
      }
      case kShflIdx:
        return seg + (s.src_arg & (w - 1));
      default:
        return lane;
    }
  }

  // Releases every warp operation of the warp starting at thread w0 all of whose lanes have
  // arrived. Returns whether any was.
  bool release_warp(int w0) {
    bool any = false;
    const int n = num_threads();
    const int lanes = std::min(kWarpSize, n - w0);
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = fibers_[w0 + l];
      if (f.state != FiberState::AtWarp) continue;
      const WarpSlot& s = f.slot;
      bool complete = true;
      for (int m = 0; m < kWarpSize; ++m) {
        if (!(s.mask >> m & 1u)) continue;
        if (m >= lanes) {
          fail_from_scheduler(f, "a warp operation (line " + std::to_string(s.line) + ") whose mask 0x" +
                                     hex(s.mask) + " names lane " + std::to_string(m) +
                                     ", which this block does not have");
          return false;
        }
        const Fiber& g = fibers_[w0 + m];
        if (g.state != FiberState::AtWarp) {
          complete = false;
          break;
        }
        if (g.slot.mask != s.mask || g.slot.kind != s.kind || g.slot.width != s.width) {
          fail_from_scheduler(f, "lanes " + std::to_string(l) + " and " + std::to_string(m) +
                                     " meet at different warp operations (lines " +
                                     std::to_string(s.line) + " and " + std::to_string(g.slot.line) +
                                     ", masks 0x" + hex(s.mask) + " and 0x" + hex(g.slot.mask) + ")");
          return false;
        }
      }
      if (!complete) continue;
      // every lane of the mask is here: compute all their results, then release them
      uint64_t ballot = 0;
      for (int m = 0; m < kWarpSize; ++m)
        if ((s.mask >> m & 1u) && fibers_[w0 + m].slot.predicate) ballot |= uint64_t(1) << m;
      for (int m = 0; m < kWarpSize; ++m) {
        if (!(s.mask >> m & 1u)) continue;
        Fiber& g = fibers_[w0 + m];
        if (s.kind == kBallot) {
          g.slot.result = ballot;
        } else if (s.kind != kSyncWarp) {
          const int src = src_lane(g.slot, m);
          if (src < 0 || src >= kWarpSize || !(s.mask >> src & 1u)) {
            fail_from_scheduler(g, "a shuffle (line " + std::to_string(s.line) + ") reads lane " +
                                       std::to_string(src) + ", which is not in its mask 0x" + hex(s.mask));
            return false;
          }
          g.slot.result = fibers_[w0 + src].slot.value;
        }
      }
      for (int m = 0; m < kWarpSize; ++m)
        if (s.mask >> m & 1u) fibers_[w0 + m].state = FiberState::Runnable;
      any = true;
    }
    return any;
  }

  bool release_barrier() {
    int waiting = 0, done = 0;
    for (const Fiber& f : fibers_) {
      waiting += f.state == FiberState::AtBarrier;
      done += f.state == FiberState::Done;
    }
    if (waiting == 0) return false;
    if (waiting + done == num_threads() && done > 0) {
      const Fiber* w = nullptr;
      const Fiber* d = nullptr;
      for (const Fiber& f : fibers_) {
        if (!w && f.state == FiberState::AtBarrier) w = &f;
        if (!d && f.state == FiberState::Done) d = &f;
      }
      fail_from_scheduler(*w, "__syncthreads (line " + std::to_string(w->barrier_line) +
                                  ") not reached by every thread of the block: thread (" +
                                  std::to_string(d->tid.x) + "," + std::to_string(d->tid.y) + "," +
                                  std::to_string(d->tid.z) + ") exited without it");
      return false;
    }
    if (waiting != num_threads()) return false;
    for (Fiber& f : fibers_) f.state = FiberState::Runnable;
    return true;
  }

  std::string describe_stall() {
    for (const Fiber& f : fibers_) {
      if (f.state == FiberState::AtWarp) {
        const int w0 = f.linear - f.linear % kWarpSize;
        for (int m = 0; m < kWarpSize; ++m) {
          if (!(f.slot.mask >> m & 1u)) continue;
          const Fiber& g = fibers_[w0 + m];
          if (g.state != FiberState::AtWarp) {
            std::string where = g.state == FiberState::Done ? "has exited" : "waits at __syncthreads";
            return prefix(f) + "a warp operation (line " + std::to_string(f.slot.line) + ") with mask 0x" +
                   hex(f.slot.mask) + " waits for lane " + std::to_string(m) + ", which " + where;
          }
        }
      }
    }
    return "fused_wloss CUDA emulation: the block's threads wait on each other (deadlock)";
  }

  std::string prefix(const Fiber& f) const {
    const Context& c = ctx();
    return "fused_wloss CUDA emulation: block (" + std::to_string(c.block_idx.x) + "," +
           std::to_string(c.block_idx.y) + "," + std::to_string(c.block_idx.z) + ") thread (" +
           std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + "): ";
  }

  void fail_from_scheduler(const Fiber& f, const std::string& what) {
    if (error_.empty()) error_ = prefix(f) + what;
  }

  std::vector<Fiber> fibers_;
  ucontext_t main_;
  const std::function<void()>* body_ = nullptr;
  std::string error_;
#if defined(FWL_EMU_ASAN)
  const void* main_stack_bottom_ = nullptr;
  size_t main_stack_size_ = 0;
#endif
};

inline const uint3& thread_idx() { return ctx().self->tid; }

// Dynamic shared memory a kernel may use without cudaFuncSetAttribute's opt-in.
constexpr size_t kDynamicSharedLimit = 48 * 1024;

// FWL_EMU_BLOCK_ORDER=shuffle[:SEED] runs the blocks of every launch in a pseudo-random order
// (SEED, default 1, picks it): a GPU runs blocks in no fixed order, so a result that depends on
// it (a race between blocks, an order-dependent float sum through atomics) changes. 0 when unset:
// blocks in index order. Read at every launch, so a test can switch it.
inline uint64_t block_order_seed() {
  const char* v = std::getenv("FWL_EMU_BLOCK_ORDER");
  if (v == nullptr || std::strncmp(v, "shuffle", 7) != 0) return 0;
  const uint64_t seed = v[7] == ':' ? std::strtoull(v + 8, nullptr, 10) : 1;
  return seed == 0 ? 1 : seed;
}

// A bijection of [0, n): a cycle-walking affine permutation k -> (a k + b) mod m over the next
// power of two m >= n, with a odd (so invertible mod m), repeated until the value falls below n.
inline uint64_t permuted(uint64_t k, uint64_t n, uint64_t seed) {
  uint64_t m = 1;
  while (m < n) m <<= 1;
  const uint64_t a = ((seed * 0x9E3779B97F4A7C15ull) | 1ull) & (m - 1);
  const uint64_t b = (seed * 0xBF58476D1CE4E5B9ull) & (m - 1);
  uint64_t v = k;
  do {
    v = (a * v + b) & (m - 1);
  } while (v >= n);
  return v;
}

// Runs `body` as a kernel over `grid` x `block` threads with `smem` bytes of dynamic shared
// memory.
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64) {
    throw Error("fused_wloss CUDA emulation: invalid block size (" + std::to_string(block.x) + "," +
                std::to_string(block.y) + "," + std::to_string(block.z) + ")");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw Error("fused_wloss CUDA emulation: invalid grid size (" + std::to_string(grid.x) + "," +
                std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
  }
  if (smem > kDynamicSharedLimit) {
    // beyond 48 KB a kernel must opt in (cudaFuncSetAttribute), which none of ours does
    throw Error("fused_wloss CUDA emulation: " + std::to_string(smem) +
                " bytes of dynamic shared memory, more than the 49152 a kernel gets without opting in");
  }
  Context& c = ctx();
  if (c.sched != nullptr) throw Error("fused_wloss CUDA emulation: a kernel launched from a kernel");
  BlockScheduler sched(static_cast<int>(nthreads));
  c.grid = grid;
  c.block = block;
  c.sched = &sched;
  c.dynamic_smem.assign(smem + 16, 0xFF);
  struct Reset {
    ~Reset() { ctx().sched = nullptr; }
  } reset;
  const uint64_t blocks = 1ull * grid.x * grid.y * grid.z;
  const uint64_t seed = block_order_seed();
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = seed == 0 ? k : permuted(k, blocks, seed);
    const unsigned x = static_cast<unsigned>(b % grid.x);
    const unsigned y = static_cast<unsigned>((b / grid.x) % grid.y);
    const unsigned z = static_cast<unsigned>(b / (1ull * grid.x * grid.y));
    c.block_idx = {x, y, z};
    ++c.block_serial;
    std::fill(c.dynamic_smem.begin(), c.dynamic_smem.end(), 0xFF);
    sched.run(body, block, ((x + y + z) & 1u) != 0);
  }
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an 8-byte value at most");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
inline T shuffle(int kind, unsigned mask, T v, int arg, int width, int line) {
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
    ctx().sched->misuse("shuffle width " + std::to_string(width) + " (line " + std::to_string(line) +
                        ") is not a power of 2 <= 32");
  }
  WarpSlot s;
  s.mask = mask;
  s.kind = kind;
  s.src_arg = arg;
  s.width = width;
  s.value = to_bits(v);
  s.line = line;
  return from_bits<T>(ctx().sched->warp_op(s));
}

}  // namespace fwl_emu

#define threadIdx (::fwl_emu::thread_idx())
#define blockIdx (static_cast<const uint3&>(::fwl_emu::ctx().block_idx))
#define blockDim (static_cast<const dim3&>(::fwl_emu::ctx().block))
#define gridDim (static_cast<const dim3&>(::fwl_emu::ctx().grid))
#define warpSize 32

#define __syncthreads() (::fwl_emu::ctx().sched->barrier(__LINE__))
#define __syncwarp(...) ::fwl_emu_syncwarp(__LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::fwl_emu::shuffle(::fwl_emu::kShflXor, mask, v, lane_mask, ::fwl_emu_width(__VA_ARGS__), __LINE__)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::fwl_emu::shuffle(::fwl_emu::kShflDown, mask, v, delta, ::fwl_emu_width(__VA_ARGS__), __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::fwl_emu::shuffle(::fwl_emu::kShflUp, mask, v, delta, ::fwl_emu_width(__VA_ARGS__), __LINE__)
#define __shfl_sync(mask, v, src, ...) \
  ::fwl_emu::shuffle(::fwl_emu::kShflIdx, mask, v, src, ::fwl_emu_width(__VA_ARGS__), __LINE__)
#define __ballot_sync(mask, pred) ::fwl_emu_ballot(mask, pred, __LINE__)

inline int fwl_emu_width() { return 32; }
inline int fwl_emu_width(int w) { return w; }

inline void fwl_emu_syncwarp(int line, unsigned mask = 0xffffffffu) {
  ::fwl_emu::WarpSlot s;
  s.mask = mask;
  s.kind = ::fwl_emu::kSyncWarp;
  s.line = line;
  ::fwl_emu::ctx().sched->warp_op(s);
}

inline unsigned fwl_emu_ballot(unsigned mask, int pred, int line) {
  ::fwl_emu::WarpSlot s;
  s.mask = mask;
  s.kind = ::fwl_emu::kBallot;
  s.predicate = pred != 0;
  s.line = line;
  return static_cast<unsigned>(::fwl_emu::ctx().sched->warp_op(s));
}

inline unsigned fwl_emu_lanemask(unsigned n) { return n >= 32 ? 0xffffffffu : ((1u << n) - 1u); }

// Device-side assertion: stops the launch with a fwl_emu::Error carrying the message.
#define FWL_EMU_DEVICE_ASSERT(cond, msg)                                              \
  do {                                                                                \
    if (!(cond)) ::fwl_emu::ctx().sched->device_assert(msg, __FILE__, __LINE__);     \
  } while (0)

// ---- atomics (fibers switch only at meeting points, but the host may run several launches on
// different threads: use real atomic instructions) -------------------------------------------

template <typename T>
inline T fwl_emu_atomic_add(T* p, T v) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T expected;
    __atomic_load(p, &expected, __ATOMIC_RELAXED);
    T desired;
    do {
      desired = expected + v;
    } while (!__atomic_compare_exchange(p, &expected, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return expected;
  }
}

inline int atomicAdd(int* p, int v) { return fwl_emu_atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return fwl_emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return fwl_emu_atomic_add(p, v); }
inline float atomicAdd(float* p, float v) { return fwl_emu_atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return fwl_emu_atomic_add(p, v); }
template <typename T, typename F>
inline T fwl_emu_atomic_update(T* p, F f) {
  T expected = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &expected, f(expected), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return expected;
}

inline int atomicMax(int* p, int v) {
  return fwl_emu_atomic_update(p, [v](int o) { return o > v ? o : v; });
}
inline int atomicMin(int* p, int v) {
  return fwl_emu_atomic_update(p, [v](int o) { return o < v ? o : v; });
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  return fwl_emu_atomic_update(p, [v](unsigned long long o) { return o < v ? o : v; });
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline int atomicCAS(int* p, int expected, int desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}

// ---- math intrinsics: the accurate libm function stands in for each fast one ----------------

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __int_as_float(int v) { return ::fwl_emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(::fwl_emu::to_bits(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- vector types used by kernels and tests ------------------------------------------------------

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
