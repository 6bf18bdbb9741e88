// Host side of the CUDA operators: checks, buffers, launch configuration and the launches, for
// the schemas of csrc/ops.cpp. Compiled twice: by nvcc into fused_wloss._C (registered for the
// CUDA dispatch key in losses_cuda.cu), and by g++ under the emulation layer into the test-only
// module fused_wloss._cuda_emu (csrc/emu/losses_emu.cpp), where the same launches run on CPU
// tensors. Nothing here reads device memory on the host: counts, weights, normalisers and the
// upstream gradient stay on the device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#if !defined(FWL_EMULATE_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <limits>
#include <tuple>

#include "../host_common.h"
#include "kernels.cuh"

namespace fused_wloss {
namespace cuda {
namespace host {

// The device guard and stream of a call.
struct CallContext {
#if defined(FWL_EMULATE_CUDA)
  explicit CallContext(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
#else
  explicit CallContext(const at::Tensor& t) : guard(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(); }
  c10::cuda::CUDAGuard guard;
#endif
};

inline void check_same_device(const at::Tensor& input, const c10::optional<at::Tensor>& t, const char* name) {
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->device() == input.device(), "fused_wloss: ", name, " must be on the input's device ",
                input.device(), ", got ", t->device());
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether p (nullptr counts as aligned: an output not written) may take 16-byte vector accesses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// How a cross-entropy launch covers the rows.
struct CeLaunch {
  bool block_per_row;
  int group;         // lanes per row (grouped kernels)
  int threads;       // blockDim.x
  int64_t blocks;    // of the forward (of its slice kernel for a split row) and of the backward
  int slices = 1;    // blocks per row or per block of pixels (ce_slices)
  int pixels = 0;    // K-dim on the (pixel blocks, images) grid: the pixels a thread takes; 0: not
  int64_t grid_y = 1;  // that grid's rows of blocks (images, at most kMaxGridRows)
  int64_t partials;  // partial sums the forward writes: its blocks, or the combine kernel's
};

// The (pixel blocks, images) grid of K-dim inputs (ce_forward_pixels_kernel): a thread takes the
// pixels of one 16-byte vector when the logits allow it and there are enough of them that half
// the threads an H100 holds still have work (132 SMs x 1024); its rows of blocks walk the images,
// at most 65535 of them (gridDim.y's limit). The emulation takes vectors whenever it may and caps
// the rows at 3, so that its small test shapes take both paths and the walk past the last row.
#if defined(FWL_EMULATE_CUDA)
constexpr int64_t kPixelVectorMinThreads = 0;
constexpr int64_t kMaxGridRows = 3;
#else
constexpr int64_t kPixelVectorMinThreads = 132 * 1024;
constexpr int64_t kMaxGridRows = 65535;
#endif

// Few long rows, or few blocks of K-dim pixels with many classes: the classes are cut into slices,
// a block each, so that the launch has about kSplitTargetBlocks blocks (two 512-thread blocks per
// SM of an H100 or H200: one full wave) while a slice keeps at least `min_classes` classes. From
// the shape alone, so that every GPU cuts alike and the sums are the same everywhere. Rows
// (`units` = rows, kMinRowSliceClasses, 16 a thread): (8, 256000) gets 31 slices a row, 248 blocks,
// where a block per row kept 8 of 132 SMs busy. K-dim (`units` = blocks of pixels,
// kMinPixelSliceClasses): (8, 32000, 512) gets 17 slices, 272 blocks instead of 16.
constexpr int64_t kSplitTargetBlocks = 264;
constexpr int64_t kMinRowSliceClasses = 8192;
constexpr int64_t kMinPixelSliceClasses = 128;

inline int ce_slices(int64_t units, int64_t C, int64_t min_classes) {
  if (units >= kSplitTargetBlocks) return 1;
  const int64_t want = ceil_div(kSplitTargetBlocks, std::max<int64_t>(units, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min(want, C / min_classes)));
}

// The (pixel blocks, images) grid of N images of `tiles` threads each (a pixel, or a vector of
// pixels, a thread): blocks of 32 to kRowsBlock threads, rows of blocks walking the images; where
// an image has fewer than a warp's worth of threads, threads == 0 (flat over the rows instead).
struct PixelGrid {
  int threads = 0;
  int64_t blocks = 0, rows = 0;
};

inline PixelGrid pixel_grid(int64_t N, int64_t tiles) {
  PixelGrid g;
  if (tiles < kWarpSize) return g;
  int64_t t = kWarpSize;
  while (t < tiles && t < kRowsBlock) t *= 2;
  g.threads = static_cast<int>(t);
  g.blocks = ceil_div(tiles, t);
  g.rows = std::min(N, kMaxGridRows);
  return g;
}

// `aligned`: the logits (and, for the backward, the gradient) start at a 16-byte boundary.
inline CeLaunch ce_launch(int64_t rows, int64_t C, int64_t P, int64_t elem_bytes, bool aligned) {
  CeLaunch l{};
  const int64_t per_vec = 16 / elem_bytes;
  if (P > 1) {  // a thread per pixel (or per vector of pixels), the classes cut into slices when the pixels are few
    l = {false, 1, kRowsBlock, ceil_div(rows, kRowsBlock)};
    l.slices = ce_slices(l.blocks, C, kMinPixelSliceClasses);
    const bool vectors = aligned && P % per_vec == 0 && P / per_vec >= kWarpSize && rows / per_vec >= kPixelVectorMinThreads;
    const int64_t pixels = vectors ? per_vec : 1;
    const PixelGrid g = pixel_grid(rows / P, P / pixels);
    if (l.slices == 1 && g.threads > 0) {  // the (pixel blocks, images) grid
      l.pixels = static_cast<int>(pixels);
      l.threads = g.threads;
      l.blocks = g.blocks;
      l.grid_y = g.rows;
    } else {  // flat over the rows, a division per row
      l.blocks *= l.slices;
    }
  } else if (C <= 4096) {  // a group of up to a warp per row, about two vectors a lane
    l.block_per_row = false;
    l.group = static_cast<int>(threads_per_row(C, per_vec, 2, kWarpSize));
    l.threads = kRowsBlock;
    l.blocks = ceil_div(rows, kRowsBlock / l.group);
  } else {  // a block per row, about four vectors a thread; at most kMaxRowBlock (512) threads, so
            // that two blocks fit on an SM at the kernels' register count
    l.block_per_row = true;
    l.group = static_cast<int>(threads_per_row(C, per_vec, 4, kMaxRowBlock));
    l.group = std::max(l.group, 128);
    l.threads = l.group;
    l.slices = ce_slices(rows, C, kMinRowSliceClasses);
    l.blocks = rows * l.slices;
  }
  l.partials = l.slices > 1 ? ceil_div(rows, kRowsBlock) : l.blocks * l.grid_y;
  return l;
}

// The one-block reduction of a cross-entropy forward's partials into its loss (none for "none"),
// written in the input's dtype or, under autocast (loss_acc), in acc_t, and its normaliser.
template <typename scalar_t>
void launch_ce_finalize(const CePartialSums* partials, int64_t count, int reduction, bool loss_acc,
                        const at::Tensor& loss, const at::Tensor& norm, cudaStream_t stream) {
  using acc_t = acc_t_of<scalar_t>;
  if (loss_acc) {
    launch_kernel(ce_finalize_kernel<acc_t, acc_t>, dim3(1), dim3(256), 0, stream, partials, count, reduction,
                  reduction == kNone ? static_cast<acc_t*>(nullptr) : loss.data_ptr<acc_t>(), norm.data_ptr<acc_t>());
  } else {
    launch_kernel(ce_finalize_kernel<scalar_t, acc_t>, dim3(1), dim3(256), 0, stream, partials, count, reduction,
                  reduction == kNone ? static_cast<scalar_t*>(nullptr) : loss.data_ptr<scalar_t>(),
                  norm.data_ptr<acc_t>());
  }
}

// What the forward and the backward kernels both read.
template <typename scalar_t>
CeKernelArgs<scalar_t> ce_kernel_args(const CeShape& s, const CeLaunch& l, const at::Tensor& x, const at::Tensor& t,
                                      const at::Tensor& class_w, const at::Tensor& sum_w, const at::Tensor& sw,
                                      int64_t ignore_index, double label_smoothing, double gamma) {
  using acc_t = acc_t_of<scalar_t>;
  CeKernelArgs<scalar_t> a{};
  a.x = x.data_ptr<scalar_t>();
  a.target = t.data_ptr();
  a.target_int32 = t.scalar_type() == at::kInt;
  a.class_w = ptr_or_null<acc_t>(class_w);
  a.sum_w = ptr_or_null<acc_t>(sum_w);
  a.sample_w = ptr_or_null<acc_t>(sw);
  a.rows = s.N * s.P;
  a.C = s.C;
  a.P = s.P;
  a.N = s.N;
  a.ignore_index = ignore_index;
  a.eps = label_smoothing;
  a.gamma = gamma;
  a.group = l.group;
  a.slices = l.slices;
  return a;
}

// The forward kernels; a split row (l.slices > 1) needs a.slice_stats for rows * slices states.
template <typename scalar_t>
void launch_ce_forward(const CeLaunch& l, const CeKernelArgs<scalar_t>& a, cudaStream_t stream) {
  if (l.slices > 1) {
    if (a.P > 1) {
      launch_kernel(ce_forward_pixel_slice_kernel<scalar_t>, grid_of(l.blocks), dim3(l.threads), 0, stream, a);
    } else {
      launch_kernel(ce_forward_slice_kernel<scalar_t>, grid_of(l.blocks), dim3(l.threads), 0, stream, a);
    }
    launch_kernel(ce_forward_combine_kernel<scalar_t>, grid_of(l.partials), dim3(kRowsBlock), 0, stream, a);
  } else if (l.pixels > 1) {
    launch_kernel(ce_forward_pixels_kernel<scalar_t, Pack<scalar_t>::kSize>, grid_of(l.blocks, l.grid_y),
                  dim3(l.threads), 0, stream, a);
  } else if (l.pixels == 1) {
    launch_kernel(ce_forward_pixels_kernel<scalar_t, 1>, grid_of(l.blocks, l.grid_y), dim3(l.threads), 0, stream, a);
  } else if (l.block_per_row) {
    launch_kernel(ce_forward_kernel<scalar_t, true>, grid_of(l.blocks), dim3(l.threads), 0, stream, a);
  } else {
    launch_kernel(ce_forward_kernel<scalar_t, false>, grid_of(l.blocks), dim3(l.threads), 0, stream, a);
  }
}

template <typename scalar_t>
void launch_ce_backward(const CeLaunch& l, const CeKernelArgs<scalar_t>& a, cudaStream_t stream) {
  if (l.pixels > 1) {
    launch_kernel(ce_backward_pixels_kernel<scalar_t, Pack<scalar_t>::kSize>, grid_of(l.blocks, l.grid_y),
                  dim3(l.threads), 0, stream, a);
  } else if (l.pixels == 1) {
    launch_kernel(ce_backward_pixels_kernel<scalar_t, 1>, grid_of(l.blocks, l.grid_y), dim3(l.threads), 0, stream, a);
  } else if (l.block_per_row) {
    launch_kernel(ce_backward_kernel<scalar_t, true>, grid_of(l.blocks), dim3(l.threads), 0, stream, a);
  } else {
    launch_kernel(ce_backward_kernel<scalar_t, false>, grid_of(l.blocks), dim3(l.threads), 0, stream, a);
  }
}

// static x dynamic class weights and their sum, on the device; undefined tensors when the call
// has neither.
inline std::pair<at::Tensor, at::Tensor> ce_class_weights(const at::Tensor& target,
                                                          const c10::optional<at::Tensor>& weight,
                                                          int64_t C, int64_t ignore_index, int64_t scheme,
                                                          double smoothing, double beta, bool need_sum,
                                                          at::ScalarType acc, cudaStream_t stream) {
  const bool has_weight = weight.has_value() && weight->defined();
  if (!has_weight && scheme == kNoScheme) return {};
  // without static weights class_weight_kernel writes the dynamic ones without reading (no ones())
  at::Tensor class_w = has_weight ? as_acc(weight, acc, "weight", C).clone() : at::empty({C}, target.options().dtype(acc));
  at::Tensor counts;
  const int64_t rows = target.numel();
  if (scheme != kNoScheme) {
    counts = at::zeros({C}, target.options().dtype(at::kLong));
    if (rows > 0) {
      constexpr int kThreads = 256;
      const bool shared_hist = C <= 8192;  // 32 KB of counters a block
      const int64_t blocks = std::min<int64_t>(ceil_div(rows, kThreads), 1024);
      launch_kernel(class_count_kernel, grid_of(blocks), dim3(kThreads),
                    shared_hist ? static_cast<size_t>(C) * sizeof(unsigned) : 0, stream, target.data_ptr(),
                    target.scalar_type() == at::kInt, rows, C, ignore_index,
                    reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), shared_hist);
    }
  }
  at::Tensor sum_w;
  if (C > 0 && (scheme != kNoScheme || need_sum)) {
    sum_w = at::empty({}, target.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "fused_wloss_class_weight", [&] {
      launch_kernel(class_weight_kernel<scalar_t>, dim3(1), dim3(kClassWeightThreads), 0, stream,
                    counts.defined() ? reinterpret_cast<const unsigned long long*>(counts.data_ptr<int64_t>())
                                     : nullptr,
                    C, static_cast<int>(scheme), smoothing, beta,
                    has_weight, class_w.data_ptr<scalar_t>(), sum_w.data_ptr<scalar_t>());
    });
  }
  return {class_w, sum_w};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& sample_weight, int64_t ignore_index, double label_smoothing,
    int64_t reduction, int64_t scheme, double smoothing, double beta, double gamma,
    c10::optional<at::ScalarType> loss_dtype) {
  check_kernel_dtype(input.scalar_type());
  const at::ScalarType out_dtype = loss_dtype_of(loss_dtype, input.scalar_type());
  const bool loss_acc = out_dtype != input.scalar_type();
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  TORCH_CHECK(target.device() == input.device(), "fused_wloss: target must be on the input's device ",
              input.device(), ", got ", target.device());
  check_same_device(input, weight, "weight");
  check_same_device(input, sample_weight, "sample_weight");
  const auto [x, s] = ce_kernel_view(input, ce_shape(input, target));  // classes-last K-dim logits in place
  const CallContext call(input);
  const cudaStream_t stream = call.stream();
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const at::Tensor t = target.contiguous();
  const int64_t rows = s.N * s.P;

  auto [class_w, sum_w] = ce_class_weights(t, weight, s.C, ignore_index, scheme, smoothing, beta,
                                           label_smoothing > 0.0, acc, stream);
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  at::Tensor lse = at::empty({2, rows}, x.options().dtype(acc));  // hi, lo (split_lse)
  at::Tensor loss_rows = reduction == kNone ? at::empty(s.loss_shape, x.options().dtype(out_dtype)) : at::Tensor();
  at::Tensor loss = reduction == kNone ? loss_rows : at::empty({}, x.options().dtype(out_dtype));
  at::Tensor norm = at::empty({}, x.options().dtype(acc));
  const at::Tensor class_weight_out = class_w.defined() ? class_w : at::empty({0}, x.options().dtype(acc));

  if (rows == 0 || s.C == 0) {
    // nothing to read; with C == 0 every target must be ignored (checked by the count kernel)
    if (rows > 0) {
      at::Tensor counts = at::zeros({1}, t.options().dtype(at::kLong));
      launch_kernel(class_count_kernel, dim3(1), dim3(256), 0, stream, t.data_ptr(), t.scalar_type() == at::kInt,
                    rows, int64_t(0), ignore_index, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
                    false);
      lse.fill_(-std::numeric_limits<double>::infinity());
    }
    if (loss_rows.defined()) loss_rows.zero_();
    const double value = reduction == kSum ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    if (reduction != kNone) loss.fill_(value);
    norm.fill_(reduction == kMean || reduction == kSampleMean ? 0.0 : 1.0);
    return {loss, lse, class_weight_out, norm};
  }

  const CeLaunch l = ce_launch(rows, s.C, s.P, x.element_size(), aligned16(x.data_ptr()));
  // "none" needs no partial sums and no finalize kernel: the forward sets the normaliser to 1
  at::Tensor partials = reduction == kNone ? at::Tensor()
                        : at::empty({l.partials * static_cast<int64_t>(sizeof(CePartialSums))}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_wloss_ce_forward", [&] {
    using acc_t = acc_t_of<scalar_t>;
    CeKernelArgs<scalar_t> a = ce_kernel_args<scalar_t>(s, l, x, t, class_w, sum_w, sw, ignore_index, label_smoothing, gamma);
    at::Tensor slice_stats;  // the states of a split row's slices, combined by the second kernel
    if (l.slices > 1) {
      slice_stats = at::empty({rows * l.slices * static_cast<int64_t>(sizeof(RowStats<acc_t>))}, x.options().dtype(at::kByte));
      a.slice_stats = reinterpret_cast<RowStats<acc_t>*>(slice_stats.data_ptr());
    }
    a.lse = lse.data_ptr<acc_t>();
    if (loss_acc) {
      a.loss_rows_acc = ptr_or_null<acc_t>(loss_rows);
    } else {
      a.loss_rows = ptr_or_null<scalar_t>(loss_rows);
    }
    if (reduction == kNone) {
      a.norm_one = norm.data_ptr<acc_t>();
      launch_ce_forward(l, a, stream);
    } else {
      a.partials = reinterpret_cast<CePartialSums*>(partials.data_ptr());
      launch_ce_forward(l, a, stream);
      launch_ce_finalize<scalar_t>(a.partials, l.partials, static_cast<int>(reduction), loss_acc, loss, norm, stream);
    }
  });
  return {loss, lse, class_weight_out, norm};
}

// The gradient of the logits into `grad_input` (x's shape, contiguous). It may be x itself when
// gamma is 0: each thread then reads a logit and writes its gradient at the same address. (The
// focal prologue reads the true class's logit from every thread of the row, so with gamma != 0 the
// gradient needs a buffer of its own: see cross_entropy_grad_.)
inline void ce_backward_into(const at::Tensor& grad_input, const at::Tensor& grad_loss, const at::Tensor& input,
                             const at::Tensor& target, const at::Tensor& class_weight,
                             const c10::optional<at::Tensor>& sample_weight, const at::Tensor& lse,
                             const at::Tensor& norm, int64_t ignore_index, double label_smoothing,
                             int64_t reduction, double gamma) {
  check_kernel_dtype(input.scalar_type());
  // a host tensor here would be read by the kernel as a device address: an illegal-address fault
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_loss, "grad_loss"},
                                {&target, "target"}, {&lse, "lse"}, {&norm, "norm"},
                                {&class_weight, "class_weight"}}) {
    check_same_device(input, *t, name);
  }
  check_same_device(input, sample_weight, "sample_weight");
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  const auto [x, s] = ce_kernel_view(input, ce_shape(input, target));  // classes-last K-dim logits in place
  const CallContext call(input);
  const cudaStream_t stream = call.stream();
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const at::Tensor t = target.contiguous();
  const int64_t rows = s.N * s.P;
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == rows, "fused_wloss: lse must have shape (2, ",
              rows, ") (the forward's log-sum-exp parts), got ", lse.sizes());
  TORCH_INTERNAL_ASSERT(grad_input.is_contiguous() && grad_input.sizes() == x.sizes());
  if (rows == 0 || s.C == 0) return;

  const at::Tensor class_w = class_weight.numel() > 0 ? as_acc(class_weight, acc, "class_weight", s.C) : at::Tensor();
  at::Tensor sum_w;
  if (class_w.defined() && label_smoothing > 0.0) {
    // the forward's sum of the weights, again: one block, which reads the weights without counts
    // and so writes nothing back to them (no copy)
    sum_w = at::empty({}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "fused_wloss_class_weight_sum", [&] {
      launch_kernel(class_weight_kernel<scalar_t>, dim3(1), dim3(kClassWeightThreads), 0, stream,
                    static_cast<const unsigned long long*>(nullptr), s.C, 0, 1.0, 0.0, true,
                    const_cast<scalar_t*>(class_w.data_ptr<scalar_t>()), sum_w.data_ptr<scalar_t>());
    });
  }
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  const at::Tensor lse_acc = lse.to(acc).contiguous();
  at::Tensor g;
  check_grad_loss(grad_loss, reduction, rows);
  g = grad_loss.to(acc).contiguous();  // a float32 upstream gradient (autocast) is not rounded
  const at::Tensor n = (reduction == kMean || reduction == kSampleMean) ? norm.to(acc).contiguous() : at::Tensor();

  const CeLaunch l = ce_launch(rows, s.C, s.P, x.element_size(), aligned16(x.data_ptr()) && aligned16(grad_input.data_ptr()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_wloss_ce_backward", [&] {
    using acc_t = acc_t_of<scalar_t>;
    CeKernelArgs<scalar_t> a = ce_kernel_args<scalar_t>(s, l, x, t, class_w, sum_w, sw, ignore_index, label_smoothing, gamma);
    a.lse = const_cast<acc_t*>(lse_acc.data_ptr<acc_t>());
    a.grad_out = g.data_ptr<acc_t>();
    a.norm = ptr_or_null<acc_t>(n);
    a.reduction = static_cast<int>(reduction);
    a.grad_x = grad_input.data_ptr<scalar_t>();
    launch_ce_backward(l, a, stream);
  });
}

inline at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                         const at::Tensor& target, const at::Tensor& class_weight,
                                         const c10::optional<at::Tensor>& sample_weight, const at::Tensor& lse,
                                         const at::Tensor& norm, int64_t ignore_index, double label_smoothing,
                                         int64_t reduction, double gamma) {
  const CeLogits l = ce_logits(input);
  if (l.rows.defined()) {  // the gradient in the logits' own classes-last layout
    at::Tensor grad_rows = at::empty(l.rows.sizes(), input.options());
    ce_backward_into(grad_rows, grad_loss, l.x, target, class_weight, sample_weight, lse, norm, ignore_index,
                     label_smoothing, reduction, gamma);
    return rows_as_input_layout(grad_rows, l.x);
  }
  const at::Tensor& x = l.x;
  at::Tensor grad_input = at::empty(x.sizes(), x.options());
  ce_backward_into(grad_input, grad_loss, x, target, class_weight, sample_weight, lse, norm, ignore_index,
                   label_smoothing, reduction, gamma);
  return grad_input;
}

inline at::Tensor& cross_entropy_grad_(at::Tensor& input, const at::Tensor& grad_loss, const at::Tensor& target,
                                       const at::Tensor& class_weight, const c10::optional<at::Tensor>& sample_weight,
                                       const at::Tensor& lse, const at::Tensor& norm, int64_t ignore_index,
                                       double label_smoothing, int64_t reduction, double gamma) {
  check_inplace_logits(input);
  if (gamma != 0.0) {  // see ce_backward_into
    const at::Tensor g = cross_entropy_backward(grad_loss, input, target, class_weight, sample_weight, lse, norm,
                                                ignore_index, label_smoothing, reduction, gamma);
    input.copy_(g);
    return input;
  }
  ce_backward_into(input, grad_loss, input, target, class_weight, sample_weight, lse, norm, ignore_index,
                   label_smoothing, reduction, gamma);
  return input;
}

// ---- cross-entropy, probability targets -------------------------------------------------------

template <typename scalar_t>
CeProbKernelArgs<scalar_t> ce_prob_kernel_args(const CeShape& s, const at::Tensor& x, const at::Tensor& t,
                                               const at::Tensor& class_w, const at::Tensor& sw,
                                               double label_smoothing) {
  using acc_t = acc_t_of<scalar_t>;
  CeProbKernelArgs<scalar_t> a{};
  a.x = x.data_ptr<scalar_t>();
  a.t = t.data_ptr();
  a.t_float = t.scalar_type() != x.scalar_type();
  a.class_w = ptr_or_null<acc_t>(class_w);
  a.sample_w = ptr_or_null<acc_t>(sw);
  a.rows = s.N * s.P;
  a.C = s.C;
  a.P = s.P;
  a.N = s.N;
  a.keep = 1.0 - label_smoothing;
  a.spread = s.C > 0 ? label_smoothing / static_cast<double>(s.C) : 0.0;
  return a;
}

// Threads of a block per row: a power of two from 32 to 256, about four classes a thread.
inline int ce_prob_threads(int64_t C) {
  int t = kWarpSize;
  while (t < 256 && 4 * t < C) t *= 2;
  return t;
}

// Rows (P == 1) of at most this many classes go the grouped rows kernels (a group of lanes per
// row, about eight classes a lane up to a warp); wider rows a block per row (see below).
constexpr int64_t kProbRowsMaxClasses = 4096;

inline int ce_prob_group(int64_t C) { return static_cast<int>(threads_per_row(C, 8, 1, kWarpSize)); }

// The block-per-row forward's fixed grid (rows a grid apart beyond it: the same partials on any
// GPU). Wider rows take the rows backward too, a block of kRowsBlock lanes per row, where there
// are rows enough for the GPU (kSplitTargetBlocks), else the flat backward. The emulation's grid
// is 4 blocks and its row minimum 4, so that small test shapes reach every path.
#if defined(FWL_EMULATE_CUDA)
constexpr int64_t kMaxProbBlocks = 4;
constexpr int64_t kProbRowBlocksMinRows = 4;
#else
constexpr int64_t kMaxProbBlocks = 16384;
constexpr int64_t kProbRowBlocksMinRows = kSplitTargetBlocks;
#endif

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& sample_weight, double label_smoothing, int64_t reduction, int64_t scheme,
    double smoothing, double beta, c10::optional<at::ScalarType> loss_dtype) {
  check_kernel_dtype(input.scalar_type());
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  TORCH_CHECK(target.device() == input.device(), "fused_wloss: target must be on the input's device ",
              input.device(), ", got ", target.device());
  check_same_device(input, weight, "weight");
  check_same_device(input, sample_weight, "sample_weight");
  const at::ScalarType out_dtype = loss_dtype_of(loss_dtype, input.scalar_type());
  const bool loss_acc = out_dtype != input.scalar_type();
  const auto [x, t, s] = ce_prob_kernel_view(input, target, ce_prob_shape(input, target));
  const CallContext call(input);
  const cudaStream_t stream = call.stream();
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const int64_t rows = s.N * s.P;
  const at::Tensor class_w = ce_prob_class_weights(t, weight, s.C, scheme, smoothing, beta, acc);
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  at::Tensor stats = at::empty({2 + 1, rows}, x.options().dtype(acc));
  at::Tensor loss_rows = reduction == kNone ? at::empty(s.loss_shape, x.options().dtype(out_dtype)) : at::Tensor();
  at::Tensor loss = reduction == kNone ? loss_rows : at::empty({}, x.options().dtype(out_dtype));
  const at::Tensor class_weight_out = class_w.defined() ? class_w : at::empty({0}, x.options().dtype(acc));
  if (rows == 0 || s.C == 0) {
    // the normaliser: the sample weights' sum or the element count (ATen on the device)
    at::Tensor norm = reduction == kMean && sw.defined()
                          ? sw.sum()
                          : at::scalar_tensor(reduction == kMean || reduction == kSampleMean
                                                  ? static_cast<double>(rows) : 1.0, x.options().dtype(acc));
    if (rows > 0) {
      stats[0].fill_(-std::numeric_limits<double>::infinity());
      stats[1].zero_();
      stats[2].zero_();
    }
    if (loss_rows.defined()) loss_rows.zero_();
    if (reduction != kNone) {
      // an empty sum over the elements: 0, divided by a "mean"'s normaliser (NaN for 0 / 0)
      loss.copy_(at::where(norm == 0, at::full({}, std::numeric_limits<double>::quiet_NaN(), norm.options()),
                           at::zeros({}, norm.options())));
    }
    return {loss, stats, class_weight_out, norm};
  }
  const bool grouped = s.P == 1 && s.C <= kProbRowsMaxClasses;
  const bool block_per_row = s.P == 1 && !grouped;
  const int group = ce_prob_group(s.C);
  const PixelGrid pg = s.P > 1 ? pixel_grid(s.N, s.P) : PixelGrid{};
  const int threads = block_per_row ? ce_prob_threads(s.C) : pg.threads > 0 ? pg.threads : kRowsBlock;
  // grouped rows kRowsBlock / group a block; a block per row up to a fixed grid; K-dim a thread per
  // pixel, on the pixel grid or flat
  const int64_t blocks = grouped         ? ceil_div(rows, kRowsBlock / group)
                         : block_per_row ? std::min(rows, kMaxProbBlocks)
                         : pg.threads > 0 ? pg.blocks * pg.rows
                                          : ceil_div(rows, kRowsBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "fused_wloss.cross_entropy: ", rows,
              " elements of probability targets need more than 2^31 - 1 blocks");
  at::Tensor partials = at::empty({blocks * static_cast<int64_t>(sizeof(CePartialSums))}, x.options().dtype(at::kByte));
  // the finalize kernel divides by the normaliser it is given: the element count, or the sample
  // weights' sum of "mean" (in the partials' weight_sum), as reduction codes of ce_finalize_kernel
  const int finalize_reduction = reduction == kMean ? (sw.defined() ? kMean : kSampleMean) : static_cast<int>(reduction);
  at::Tensor norm_out = at::empty({}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_wloss_ce_prob_forward", [&] {
    using acc_t = acc_t_of<scalar_t>;
    CeProbKernelArgs<scalar_t> a = ce_prob_kernel_args<scalar_t>(s, x, t, class_w, sw, label_smoothing);
    a.stats = stats.data_ptr<acc_t>();
    if (loss_acc) {
      a.loss_rows_acc = ptr_or_null<acc_t>(loss_rows);
    } else {
      a.loss_rows = ptr_or_null<scalar_t>(loss_rows);
    }
    a.partials = reinterpret_cast<CePartialSums*>(partials.data_ptr());
    a.group = group;
    if (grouped) {
      launch_kernel(ce_prob_forward_rows_kernel<scalar_t>, grid_of(blocks), dim3(threads), 0, stream, a);
    } else if (block_per_row) {
      launch_kernel(ce_prob_forward_kernel<scalar_t, true>, grid_of(blocks), dim3(threads), 0, stream, a);
    } else if (pg.threads > 0) {
      launch_kernel(ce_prob_forward_pixels_kernel<scalar_t>, grid_of(pg.blocks, pg.rows), dim3(threads), 0, stream, a);
    } else {
      launch_kernel(ce_prob_forward_kernel<scalar_t, false>, grid_of(blocks), dim3(threads), 0, stream, a);
    }
    launch_ce_finalize<scalar_t>(a.partials, blocks, finalize_reduction, loss_acc, loss, norm_out, stream);
  });
  return {loss, stats, class_weight_out, norm_out};
}

inline at::Tensor cross_entropy_prob_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                              const at::Tensor& target, const at::Tensor& class_weight,
                                              const c10::optional<at::Tensor>& sample_weight, const at::Tensor& stats,
                                              const at::Tensor& norm, double label_smoothing, int64_t reduction) {
  check_kernel_dtype(input.scalar_type());
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  TORCH_CHECK(target.device() == input.device(), "fused_wloss: target must be on the input's device ",
              input.device(), ", got ", target.device());
  check_same_device(input, sample_weight, "sample_weight");
  TORCH_CHECK(class_weight.device() == input.device() && stats.device() == input.device() &&
                  norm.device() == input.device() && grad_loss.device() == input.device(),
              "fused_wloss: grad_loss, class_weight, stats and norm must be on the input's device ", input.device());
  const auto [x, t, s] = ce_prob_kernel_view(input, target, ce_prob_shape(input, target));
  const CallContext call(input);
  const cudaStream_t stream = call.stream();
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const int64_t rows = s.N * s.P;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == rows, "fused_wloss: stats must have "
              "shape (3, ", rows, ") (the forward's per-element statistics), got ", stats.sizes());
  check_grad_loss(grad_loss, reduction, rows);
  at::Tensor grad_input = at::empty(x.sizes(), x.options());  // classes-last rows: see the return
  if (rows == 0 || s.C == 0) return ce_prob_grad_as_input(grad_input, input);
  const at::Tensor class_w = class_weight.numel() > 0 ? as_acc(class_weight, acc, "class_weight", s.C) : at::Tensor();
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  const at::Tensor stats_acc = stats.to(acc).contiguous();
  const at::Tensor g = grad_loss.to(acc).contiguous();
  const at::Tensor n = (reduction == kMean || reduction == kSampleMean) ? norm.to(acc).contiguous() : at::Tensor();
  const int64_t numel = rows * s.C;
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, 256), int64_t(1) << 20);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_wloss_ce_prob_backward", [&] {
    using acc_t = acc_t_of<scalar_t>;
    CeProbKernelArgs<scalar_t> a = ce_prob_kernel_args<scalar_t>(s, x, t, class_w, sw, label_smoothing);
    a.stats = const_cast<acc_t*>(stats_acc.data_ptr<acc_t>());
    a.grad_out = g.data_ptr<acc_t>();
    a.norm = ptr_or_null<acc_t>(n);
    a.reduction = static_cast<int>(reduction);
    a.grad_x = grad_input.data_ptr<scalar_t>();
    const PixelGrid pg = s.P > 1 ? pixel_grid(s.N, s.P) : PixelGrid{};
    if (s.P == 1 && (s.C <= kProbRowsMaxClasses || rows >= kProbRowBlocksMinRows)) {
      // a group of lanes per row, a whole block for wide rows (the backward needs no shuffles)
      a.group = s.C <= kProbRowsMaxClasses ? ce_prob_group(s.C) : kRowsBlock;
      launch_kernel(ce_prob_backward_rows_kernel<scalar_t>, grid_of(ceil_div(rows, kRowsBlock / a.group)),
                    dim3(kRowsBlock), 0, stream, a);
    } else if (pg.threads > 0) {
      launch_kernel(ce_prob_backward_pixels_kernel<scalar_t>, grid_of(pg.blocks, pg.rows), dim3(pg.threads), 0,
                    stream, a);
    } else {
      launch_kernel(ce_prob_backward_kernel<scalar_t>, grid_of(blocks), dim3(256), 0, stream, a);
    }
  });
  return ce_prob_grad_as_input(grad_input, input);
}

// ---- binary cross-entropy ---------------------------------------------------------------------

constexpr int64_t kBceElemsPerBlock = 4096;
constexpr int64_t kBceMaxSegments = 1024;


template <typename scalar_t>
BceKernelArgs<scalar_t> bce_args(const BceInputs& b, double gamma, double alpha) {
  using acc_t = acc_t_of<scalar_t>;
  BceKernelArgs<scalar_t> a{};
  a.x = b.x.data_ptr<scalar_t>();
  a.t = b.t.data_ptr();
  a.t_float = b.t.scalar_type() != b.x.scalar_type();  // float32 targets with half logits
  a.numel = b.x.numel();
  a.L = b.shape.L;
  a.elems_per_block = kBceElemsPerBlock;
  static_assert(kBceElemsPerBlock % bce_vector_elems<scalar_t>() == 0, "a block's range holds whole vectors");
  a.neg_label = ptr_or_null<acc_t>(b.neg_label);
  a.pos_label = ptr_or_null<acc_t>(b.pos_label);
  a.elem_w = ptr_or_null<acc_t>(b.elem_w);
  a.elem_pos_w = ptr_or_null<acc_t>(b.elem_pos_w);
  a.sample_w = ptr_or_null<acc_t>(b.sw);
  a.gamma = static_cast<acc_t>(gamma);
  a.alpha = static_cast<acc_t>(alpha);
  return a;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_forward(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
    int64_t scheme, double smoothing, double beta, bool balanced, double gamma, double alpha,
    c10::optional<at::ScalarType> loss_dtype) {
  check_kernel_dtype(input.scalar_type());
  const at::ScalarType out_dtype = loss_dtype_of(loss_dtype, input.scalar_type());
  const bool loss_acc = out_dtype != input.scalar_type();
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  TORCH_CHECK(target.device() == input.device(), "fused_wloss: target must be on the input's device ",
              input.device(), ", got ", target.device());
  check_same_device(input, weight, "weight");
  check_same_device(input, pos_weight, "pos_weight");
  check_same_device(input, sample_weight, "sample_weight");
  const BceShape s = bce_shape(input, target);
  const CallContext call(input);
  const cudaStream_t stream = call.stream();
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  at::Tensor neg_dyn = at::empty({0}, input.options().dtype(acc));
  at::Tensor pos_dyn = at::empty({0}, input.options().dtype(acc));
  if (scheme != kNoScheme) {
    neg_dyn = at::empty({s.L}, input.options().dtype(acc));
    pos_dyn = at::empty({s.L}, input.options().dtype(acc));
    if (s.L > 0) {
      const at::Tensor tc = target.contiguous();
      // enough segments to keep the GPU busy, bounded so that the partials stay small
      const int64_t segments = std::max<int64_t>(
          1, std::min({s.rows, kBceMaxSegments, std::max<int64_t>(1, (int64_t(1) << 22) / s.L)}));
      const int64_t per = ceil_div(std::max<int64_t>(s.rows, 1), segments);
      at::Tensor part = at::empty({segments * s.L}, input.options().dtype(at::kDouble));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tc.scalar_type(), "fused_wloss_bce_counts", [&] {
        launch_kernel(bce_label_sum_kernel<scalar_t>, grid_of(segments), dim3(kBceLabelSumThreads), 0, stream,
                      tc.data_ptr<scalar_t>(), s.rows, s.L, per, part.data_ptr<double>());
      });
      AT_DISPATCH_FLOATING_TYPES(acc, "fused_wloss_bce_label_weights", [&] {
        launch_kernel(bce_label_weight_kernel<scalar_t>, grid_of(ceil_div(s.L, 256)), dim3(256), 0, stream,
                      static_cast<const double*>(part.data_ptr<double>()), segments, s.rows, s.L, per,
                      static_cast<int>(scheme), smoothing, beta,
                      balanced, neg_dyn.data_ptr<scalar_t>(), pos_dyn.data_ptr<scalar_t>());
      });
    }
  }
  const BceInputs b = bce_inputs(input, target, weight, pos_weight, sample_weight, neg_dyn, pos_dyn);
  const int64_t numel = b.x.numel();
  at::Tensor loss_elems = reduction == kNone ? at::empty(input.sizes(), input.options().dtype(out_dtype)) : at::Tensor();
  at::Tensor loss = reduction == kNone ? loss_elems : at::empty({}, input.options().dtype(out_dtype));
  if (numel == 0) {
    if (reduction != kNone) loss.fill_(reduction == kSum ? 0.0 : std::numeric_limits<double>::quiet_NaN());
    return {loss, neg_dyn, pos_dyn};
  }
  const int64_t blocks = ceil_div(numel, kBceElemsPerBlock);
  at::Tensor partials = at::empty({blocks}, input.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_wloss_bce_forward", [&] {
    using acc_t = acc_t_of<scalar_t>;
    BceKernelArgs<scalar_t> a = bce_args<scalar_t>(b, gamma, alpha);
    if (loss_acc) {
      a.loss_elems_acc = ptr_or_null<acc_t>(loss_elems);
    } else {
      a.loss_elems = ptr_or_null<scalar_t>(loss_elems);
    }
    a.partials = partials.data_ptr<double>();
    a.vectorized = aligned16(a.x) && aligned16(a.t) && aligned16(a.loss_elems) && aligned16(a.loss_elems_acc);
    launch_kernel(bce_forward_kernel<scalar_t>, grid_of(blocks), dim3(kBceThreads), 0, stream, a);
    if (reduction != kNone) {
      const double divisor = reduction == kSum ? 1.0 : static_cast<double>(numel);
      const auto* sums = static_cast<const double*>(a.partials);
      if (loss_acc) {
        launch_kernel(bce_finalize_kernel<acc_t>, dim3(1), dim3(256), 0, stream, sums, blocks, divisor,
                      loss.data_ptr<acc_t>());
      } else {
        launch_kernel(bce_finalize_kernel<scalar_t>, dim3(1), dim3(256), 0, stream, sums, blocks, divisor,
                      loss.data_ptr<scalar_t>());
      }
    }
  });
  return {loss, neg_dyn, pos_dyn};
}

inline at::Tensor bce_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                               const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                               const c10::optional<at::Tensor>& sample_weight, const at::Tensor& neg_label_weight,
                               const at::Tensor& pos_label_weight, int64_t reduction, double gamma,
                               double alpha) {
  check_kernel_dtype(input.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_loss, "grad_loss"},
                                {&target, "target"}, {&neg_label_weight, "neg_label_weight"},
                                {&pos_label_weight, "pos_label_weight"}}) {
    check_same_device(input, *t, name);
  }
  check_same_device(input, weight, "weight");
  check_same_device(input, pos_weight, "pos_weight");
  check_same_device(input, sample_weight, "sample_weight");
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  const CallContext call(input);
  const cudaStream_t stream = call.stream();
  const BceInputs b =
      bce_inputs(input, target, weight, pos_weight, sample_weight, neg_label_weight, pos_label_weight);
  const int64_t numel = b.x.numel();
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  check_grad_loss(grad_loss, reduction, numel);
  if (numel == 0) return grad_input;
  const at::Tensor g = grad_loss.to(acc_dtype(input.scalar_type())).contiguous();  // as cross_entropy_backward
  const double divisor = reduction == kSum || reduction == kNone ? 1.0 : static_cast<double>(numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_wloss_bce_backward", [&] {
    BceKernelArgs<scalar_t> a = bce_args<scalar_t>(b, gamma, alpha);
    a.grad_out = g.data_ptr<acc_t_of<scalar_t>>();
    a.reduction = static_cast<int>(reduction);
    a.grad_x = grad_input.data_ptr<scalar_t>();
    a.vectorized = aligned16(a.x) && aligned16(a.t) && aligned16(a.grad_x);
    // a thread a vector; beyond 2^20 blocks the threads walk the rest
    const int64_t blocks = std::min<int64_t>(ceil_div(numel, kBceThreads * bce_vector_elems<scalar_t>()), int64_t(1) << 20);
    launch_kernel(bce_backward_kernel<scalar_t>, grid_of(blocks), dim3(kBceThreads), 0, stream, a, divisor);
  });
  return grad_input;
}

}  // namespace host
}  // namespace cuda
}  // namespace fused_wloss
