// CPU implementations of the fused_wloss operators (schemas in csrc/ops.cpp).
//
// Host side of the kernels: argument checks, the class counts and dynamic weights, the cut of the
// rows into chunks (kernel_table.h), at::parallel_for over the chunks, and the reduction of the
// per-chunk partial sums in chunk order. The vectorised per-chunk work runs through the
// KernelTable of the best instruction set this CPU has (installed from Python at import).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "../fused_wloss_math.h"
#include "../host_common.h"
#include "kernel_table.h"

namespace fused_wloss {
namespace cpu {

namespace {
std::atomic<const KernelTable*> g_kernels{nullptr};
}  // namespace

void set_kernel_table(const KernelTable* table) { g_kernels.store(table); }
const KernelTable* kernel_table_or_null() { return g_kernels.load(); }

namespace {

const KernelTable& kernels() {
  const KernelTable* t = g_kernels.load();
  TORCH_CHECK(t != nullptr,
              "fused_wloss: no CPU kernels are installed; import fused_wloss (which installs the "
              "kernels for this CPU) before calling torch.ops.fused_wloss directly");
  return *t;
}

int dtype_index(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return kFloat;
    case at::kDouble:
      return kDouble;
    case at::kHalf:
      return kHalf;
    case at::kBFloat16:
      return kBFloat16;
    default:
      TORCH_CHECK(false, "fused_wloss: input must be float32, float64, float16 or bfloat16, got ",
                  s);
  }
}

// Class counts of the non-ignored targets (exact integer sums: per-thread histograms added in any
// order give the same counts), then class_w[c] = static[c] * scheme(count[c]).
at::Tensor ce_class_weights(const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                            int64_t C, int64_t ignore_index, int64_t scheme, double smoothing,
                            double beta, at::ScalarType acc) {
  const bool has_weight = weight.has_value() && weight->defined();
  if (!has_weight && scheme == kNoScheme) return at::Tensor();
  at::Tensor class_w = has_weight ? as_acc(weight, acc, "weight", C).clone()
                                  : at::ones({C}, target.options().dtype(acc));
  if (scheme == kNoScheme) return class_w;

  const int64_t rows = target.numel();
  const bool is_int32 = target.scalar_type() == at::kInt;
  const void* tp = target.data_ptr();
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> hist(static_cast<size_t>(nthreads) * C, 0);
  std::vector<int64_t> bad_row(nthreads, -1), bad_value(nthreads, 0);
  at::parallel_for(0, rows, 16384, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    int64_t* h = hist.data() + static_cast<size_t>(tid) * C;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = is_int32 ? static_cast<const int32_t*>(tp)[r]
                                 : static_cast<const int64_t*>(tp)[r];
      if (t == ignore_index) continue;
      if (t < 0 || t >= C) {
        if (bad_row[tid] < 0 || r < bad_row[tid]) {
          bad_row[tid] = r;
          bad_value[tid] = t;
        }
        continue;
      }
      ++h[t];
    }
  });
  int64_t first_bad = -1, first_value = 0;
  for (int i = 0; i < nthreads; ++i) {
    if (bad_row[i] >= 0 && (first_bad < 0 || bad_row[i] < first_bad)) {
      first_bad = bad_row[i];
      first_value = bad_value[i];
    }
  }
  if (first_bad >= 0) throw_bad_target(first_bad, first_value, C, ignore_index);

  AT_DISPATCH_FLOATING_TYPES(acc, "ce_class_weights", [&] {
    scalar_t* w = class_w.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      int64_t n = 0;
      for (int i = 0; i < nthreads; ++i) n += hist[static_cast<size_t>(i) * C + c];
      w[c] *= static_cast<scalar_t>(scheme_weight(scheme, static_cast<double>(n), smoothing, beta));
    }
  });
  return class_w;
}

// The gradient of the logits is as large as the logits and written once, so for a large one the
// cost of fresh pages (the kernel zeroes every page on first touch) rivals the kernel itself: in a
// profile of a 32 MB backward, clear_page took more time than the gradient arithmetic. Large
// outputs (1 MiB and more) therefore come from a small cache of blocks that earlier gradients released (a training
// loop frees each step's logits gradient before the next backward), the way torch's CUDA caching
// allocator keeps device memory. New blocks are 2 MiB-aligned and advised for transparent huge
// pages. The cache holds at most FUSED_WLOSS_CPU_CACHE_MB megabytes of released blocks (default
// 1024; 0 turns it off); fused_wloss._C.empty_cpu_cache() returns them to the system.
class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: blocks outlive static teardown
    return *cache;
  }

  void* allocate(size_t bytes, size_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the smallest released block that fits without wasting more than half of it
      auto best = blocks_.end();
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
        if (it->second >= bytes && it->second <= 2 * bytes &&
            (best == blocks_.end() || it->second < best->second)) {
          best = it;
        }
      }
      if (best != blocks_.end()) {
        void* p = best->first;
        *capacity = best->second;
        held_ -= best->second;
        blocks_.erase(best);
        return p;
      }
    }
    // huge-page blocks from 2 MiB up; smaller ones page-aligned
    const size_t align = bytes >= kHugePage ? kHugePage : kPage;
    const size_t rounded = (bytes + align - 1) / align * align;
    void* p = nullptr;
    if (posix_memalign(&p, align, rounded) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHugePage) madvise(p, rounded, MADV_HUGEPAGE);  // advice only
#endif
    *capacity = rounded;
    return p;
  }

  void release(void* p, size_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + capacity <= limit_) {
        blocks_.emplace_back(p, capacity);
        held_ += capacity;
        return;
      }
    }
    std::free(p);
  }

  void clear() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
      held_ = 0;
    }
    for (auto& b : blocks) std::free(b.first);
  }

  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kPage = 4096;

 private:
  OutputCache() {
    const char* env = std::getenv("FUSED_WLOSS_CPU_CACHE_MB");
    limit_ = (env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(1024)) << 20;
  }
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t held_ = 0;
  size_t limit_ = 0;
};

at::Tensor empty_large_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kThreshold = size_t(1) << 20;  // below this, torch's allocator is as good
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes >= kThreshold) {
    size_t capacity = 0;
    void* p = OutputCache::get().allocate(bytes, &capacity);
    if (p != nullptr) {
      return at::from_blob(
          p, sizes, [capacity](void* q) { OutputCache::get().release(q, capacity); }, options);
    }
  }
  return at::empty(sizes, options);
}

}  // namespace

void empty_cpu_cache() { OutputCache::get().clear(); }

namespace {

// The float64 sum of a vector, first to last; a contiguous float or double one is read in place (the
// linear head calls this once per chunk of rows, with C-long class weights: no float64 copy each).
double sum_in_order(const at::Tensor& t, int64_t fallback) {
  if (!t.defined()) return static_cast<double>(fallback);
  const bool direct = t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
  const at::Tensor d = direct ? t : t.contiguous().to(at::kDouble);
  double s = 0;
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "sum_in_order", [&] {
    const scalar_t* p = d.data_ptr<scalar_t>();
    for (int64_t i = 0; i < d.numel(); ++i) s += static_cast<double>(p[i]);
  });
  return s;
}

// What both cross-entropy operators establish first: the (N, C, P) view, the dtype's table index
// and accumulation type, contiguous input and target, and the number of rows.
struct CeCall {
  CeShape s;
  int di;
  at::ScalarType acc;
  at::Tensor x, t;
  int64_t rows;
};

CeCall ce_call(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ",
              reduction);
  auto [x, s] = ce_kernel_view(input, ce_shape(input, target));  // classes-last K-dim logits in place
  const int64_t rows = s.N * s.P;
  return {std::move(s), dtype_index(input.scalar_type()), acc_dtype(input.scalar_type()), std::move(x),
          target.contiguous(), rows};
}

// The upstream gradient of a reduced cross-entropy loss, divided by the normaliser of a "mean"; a
// zero normaliser gives NaN for every element that takes part, as torch (ignored elements keep 0).
// (grad_loss checked by check_grad_loss)
double reduced_upstream(const at::Tensor& grad_loss, const at::Tensor& norm, int64_t reduction) {
  double g = grad_loss.to(at::kDouble).item<double>();  // host memory: no device sync
  if (reduction == kMean || reduction == kSampleMean) {
    const double n = norm.to(at::kDouble).item<double>();
    g = n == 0.0 ? std::numeric_limits<double>::quiet_NaN() : g / n;
  }
  return g;
}

// The upstream gradient of a cross-entropy backward, checked: per element for "none" (`rows`, in
// acc_t, held here for the kernel's pointer), else one scalar (reduced_upstream).
struct Upstream {
  at::Tensor rows;
  double scalar = 0.0;
};

Upstream upstream_of(const at::Tensor& grad_loss, const at::Tensor& norm, int64_t reduction, int64_t rows,
                     at::ScalarType acc) {
  check_grad_loss(grad_loss, reduction, rows);
  Upstream u;
  if (reduction == kNone) {
    u.rows = grad_loss.to(acc).contiguous();
  } else {
    u.scalar = reduced_upstream(grad_loss, norm, reduction);
  }
  return u;
}

CeInputs ce_inputs(const CeShape& s, const at::Tensor& x, const at::Tensor& t,
                   const at::Tensor& class_w, const at::Tensor& sw, int64_t ignore_index,
                   double label_smoothing, double gamma) {
  CeInputs in{};
  in.layout = make_ce_layout(s.N, s.C, s.P);
  in.input = x.data_ptr();
  in.target = t.data_ptr();
  in.target_int32 = t.scalar_type() == at::kInt;
  in.class_w = class_w.defined() ? class_w.data_ptr() : nullptr;
  in.sample_w = sw.defined() ? sw.data_ptr() : nullptr;
  in.sum_w = sum_in_order(class_w, s.C);
  in.ignore_index = ignore_index;
  in.label_smoothing = label_smoothing;
  in.gamma = gamma;
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& sample_weight, int64_t ignore_index, double label_smoothing,
    int64_t reduction, int64_t scheme, double smoothing, double beta, double gamma,
    c10::optional<at::ScalarType> loss_dtype) {
  const auto [s, di, acc, x, t, rows] = ce_call(input, target, reduction);
  const at::ScalarType out_dtype = loss_dtype_of(loss_dtype, input.scalar_type());

  const at::Tensor class_w =
      ce_class_weights(t, weight, s.C, ignore_index, scheme, smoothing, beta, acc);
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  at::Tensor lse = at::empty({2, rows}, x.options().dtype(acc));  // hi, lo (split_lse)
  at::Tensor loss_rows;
  if (reduction == kNone) loss_rows = at::empty(s.loss_shape, x.options().dtype(out_dtype));

  CeForwardArgs args{};
  args.in = ce_inputs(s, x, t, class_w, sw, ignore_index, label_smoothing, gamma);
  args.loss_out = loss_rows.defined() ? loss_rows.data_ptr() : nullptr;
  args.loss_out_acc = out_dtype != x.scalar_type();
  args.lse_hi_out = lse.data_ptr();
  args.lse_lo_out = static_cast<char*>(lse.data_ptr()) + rows * lse.element_size();

  std::vector<CePartial> partials(args.in.layout.num_chunks, CePartial{0, 0, 0, -1, 0});
  if (rows > 0 && s.C == 0) {
    // no class at all: every target must be ignored, and each element's loss is 0
    const bool is_int32 = args.in.target_int32;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t tv = is_int32 ? t.data_ptr<int32_t>()[r] : t.data_ptr<int64_t>()[r];
      if (tv != ignore_index) throw_bad_target(r, tv, s.C, ignore_index);
    }
    if (loss_rows.defined()) loss_rows.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  if (rows > 0 && s.C > 0) {
    const CeForwardFn fn = kernels().ce_forward[di];
    at::parallel_for(0, args.in.layout.num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) fn(args, c, &partials[c]);
    });
  }
  double loss_sum = 0, weight_sum = 0;
  int64_t valid = 0;
  for (const CePartial& p : partials) {  // chunk order: the same sums for any thread count
    if (p.bad_row >= 0) throw_bad_target(p.bad_row, p.bad_value, s.C, ignore_index);
    loss_sum += p.loss_sum;
    weight_sum += p.weight_sum;
    valid += p.valid;
  }
  double norm = 1.0;
  if (reduction == kMean) norm = weight_sum;
  if (reduction == kSampleMean) norm = static_cast<double>(valid);
  // a zero normaliser gives NaN, as torch (not +inf when label smoothing makes loss_sum > 0)
  const double value = norm == 0.0 ? std::numeric_limits<double>::quiet_NaN() : loss_sum / norm;
  at::Tensor loss = reduction == kNone ? loss_rows : at::scalar_tensor(value, x.options().dtype(out_dtype));
  return {loss, lse, class_w.defined() ? class_w : at::empty({0}, x.options().dtype(acc)),
          at::scalar_tensor(norm, x.options().dtype(acc))};
}

namespace {

// The gradient of the logits into `grad_input` (x's shape; it may be x itself: the kernels read
// every logit before they write its gradient).
void ce_backward_into(const at::Tensor& grad_input, const at::Tensor& grad_loss, const at::Tensor& input,
                      const at::Tensor& target, const at::Tensor& class_weight,
                      const c10::optional<at::Tensor>& sample_weight, const at::Tensor& lse,
                      const at::Tensor& norm, int64_t ignore_index, double label_smoothing, int64_t reduction,
                      double gamma) {
  const auto [s, di, acc, x, t, rows] = ce_call(input, target, reduction);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == rows, "fused_wloss: lse must have shape (2, ",
              rows, ") (the forward's log-sum-exp parts), got ", lse.sizes());
  const at::Tensor class_w =
      class_weight.numel() > 0 ? as_acc(class_weight, acc, "class_weight", s.C) : at::Tensor();
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  const at::Tensor lse_acc = lse.to(acc).contiguous();
  TORCH_INTERNAL_ASSERT(grad_input.is_contiguous() && grad_input.sizes() == x.sizes());

  CeBackwardArgs args{};
  args.in = ce_inputs(s, x, t, class_w, sw, ignore_index, label_smoothing, gamma);
  args.lse_hi = lse_acc.data_ptr();
  args.lse_lo = static_cast<const char*>(lse_acc.data_ptr()) + rows * lse_acc.element_size();
  const Upstream up = upstream_of(grad_loss, norm, reduction, rows, acc);
  if (up.rows.defined()) args.grad_rows = up.rows.data_ptr();
  args.grad_scalar = up.scalar;
  args.grad_input = grad_input.data_ptr();
  // stream a gradient too large to stay in cache (a few times the last-level cache of one core)
  args.streaming_stores = grad_input.nbytes() >= (size_t(16) << 20);
  if (rows > 0 && s.C > 0) {
    const CeBackwardFn fn = kernels().ce_backward[di];
    at::parallel_for(0, args.in.layout.num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) fn(args, c);
    });
  }
}

}  // namespace

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                      const at::Tensor& target, const at::Tensor& class_weight,
                                      const c10::optional<at::Tensor>& sample_weight,
                                      const at::Tensor& lse, const at::Tensor& norm,
                                      int64_t ignore_index, double label_smoothing,
                                      int64_t reduction, double gamma) {
  const CeLogits l = ce_logits(input);
  if (l.rows.defined()) {  // the gradient in the logits' own classes-last layout
    at::Tensor grad_rows = empty_large_output(l.rows.sizes(), input.options());
    ce_backward_into(grad_rows, grad_loss, l.x, target, class_weight, sample_weight, lse, norm, ignore_index,
                     label_smoothing, reduction, gamma);
    return rows_as_input_layout(grad_rows, l.x);
  }
  const at::Tensor& x = l.x;
  at::Tensor grad_input = empty_large_output(x.sizes(), x.options());
  ce_backward_into(grad_input, grad_loss, x, target, class_weight, sample_weight, lse, norm, ignore_index,
                   label_smoothing, reduction, gamma);
  return grad_input;
}

at::Tensor& cross_entropy_grad_cpu(at::Tensor& input, const at::Tensor& grad_loss, const at::Tensor& target,
                                   const at::Tensor& class_weight, const c10::optional<at::Tensor>& sample_weight,
                                   const at::Tensor& lse, const at::Tensor& norm, int64_t ignore_index,
                                   double label_smoothing, int64_t reduction, double gamma) {
  check_inplace_logits(input);
  ce_backward_into(input, grad_loss, input, target, class_weight, sample_weight, lse, norm, ignore_index,
                   label_smoothing, reduction, gamma);
  return input;
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy with probability targets

namespace {

CeProbArgs ce_prob_args(const CeShape& s, const at::Tensor& x, const at::Tensor& t, const at::Tensor& class_w,
                        const at::Tensor& sw, double label_smoothing) {
  CeProbArgs a{};
  a.layout = make_ce_layout(s.N, s.C, s.P);
  a.input = x.data_ptr();
  a.target = t.data_ptr();
  a.target_float = t.scalar_type() != x.scalar_type();
  a.class_w = class_w.defined() ? class_w.data_ptr() : nullptr;
  a.sample_w = sw.defined() ? sw.data_ptr() : nullptr;
  a.label_smoothing = label_smoothing;
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& sample_weight, double label_smoothing, int64_t reduction, int64_t scheme,
    double smoothing, double beta, c10::optional<at::ScalarType> loss_dtype) {
  const int di = dtype_index(input.scalar_type());
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const auto [x, t, s] = ce_prob_kernel_view(input, target, ce_prob_shape(input, target));
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  const at::ScalarType out_dtype = loss_dtype_of(loss_dtype, input.scalar_type());
  const int64_t rows = s.N * s.P;
  const at::Tensor class_w = ce_prob_class_weights(t, weight, s.C, scheme, smoothing, beta, acc);
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  at::Tensor stats = at::empty({3, rows}, x.options().dtype(acc));  // lse hi, lse lo, B
  at::Tensor loss_rows;
  if (reduction == kNone) loss_rows = at::empty(s.loss_shape, x.options().dtype(out_dtype));

  CeProbArgs args = ce_prob_args(s, x, t, class_w, sw, label_smoothing);
  args.loss_out = loss_rows.defined() ? loss_rows.data_ptr() : nullptr;
  args.loss_out_acc = out_dtype != x.scalar_type();
  args.stats_out = stats.data_ptr();
  std::vector<CePartial> partials(args.layout.num_chunks, CePartial{0, 0, 0, -1, 0});
  if (rows > 0 && s.C == 0) {  // no class: every element's loss is an empty sum
    if (loss_rows.defined()) loss_rows.zero_();
    stats[0].fill_(-std::numeric_limits<double>::infinity());
    stats[1].zero_();
    stats[2].zero_();
  }
  if (rows > 0 && s.C > 0) {
    const CeProbForwardFn fn = kernels().ce_prob_forward[di];
    at::parallel_for(0, args.layout.num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) fn(args, c, &partials[c]);
    });
  }
  double loss_sum = 0;
  for (const CePartial& p : partials) loss_sum += p.loss_sum;  // chunk order: any thread count
  double norm = 1.0;
  if (reduction == kMean) norm = sw.defined() ? sum_in_order(sw, 0) : static_cast<double>(rows);
  if (reduction == kSampleMean) norm = static_cast<double>(rows);
  const double value = norm == 0.0 ? std::numeric_limits<double>::quiet_NaN() : loss_sum / norm;
  at::Tensor loss = reduction == kNone ? loss_rows : at::scalar_tensor(value, x.options().dtype(out_dtype));
  return {loss, stats, class_w.defined() ? class_w : at::empty({0}, x.options().dtype(acc)),
          at::scalar_tensor(norm, x.options().dtype(acc))};
}

at::Tensor cross_entropy_prob_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                           const at::Tensor& target, const at::Tensor& class_weight,
                                           const c10::optional<at::Tensor>& sample_weight, const at::Tensor& stats,
                                           const at::Tensor& norm, double label_smoothing, int64_t reduction) {
  const int di = dtype_index(input.scalar_type());
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const auto [x, t, s] = ce_prob_kernel_view(input, target, ce_prob_shape(input, target));
  TORCH_CHECK(reduction >= kNone && reduction <= kSampleMean, "fused_wloss: bad reduction code ", reduction);
  const int64_t rows = s.N * s.P;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == rows, "fused_wloss: stats must have "
              "shape (3, ", rows, ") (the forward's per-element statistics), got ", stats.sizes());
  const at::Tensor class_w =
      class_weight.numel() > 0 ? as_acc(class_weight, acc, "class_weight", s.C) : at::Tensor();
  const at::Tensor sw = as_acc(sample_weight, acc, "sample_weight", rows);
  const at::Tensor stats_acc = stats.to(acc).contiguous();
  at::Tensor grad_input = empty_large_output(x.sizes(), x.options());

  CeProbArgs args = ce_prob_args(s, x, t, class_w, sw, label_smoothing);
  args.stats = stats_acc.data_ptr();
  const Upstream up = upstream_of(grad_loss, norm, reduction, rows, acc);
  if (up.rows.defined()) args.grad_rows = up.rows.data_ptr();
  args.grad_scalar = up.scalar;
  args.grad_input = grad_input.data_ptr();
  if (rows > 0 && s.C > 0) {
    const CeProbBackwardFn fn = kernels().ce_prob_backward[di];
    at::parallel_for(0, args.layout.num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) fn(args, c);
    });
  }
  return ce_prob_grad_as_input(grad_input, input);
}

// ---------------------------------------------------------------------------------------------
// Binary cross-entropy

namespace {

// Sums of the targets and of their complements per label over the rows, in a fixed number of
// row segments reduced in order: the same doubles for any thread count.
void label_counts(const at::Tensor& t, const BceShape& s, std::vector<double>* pos,
                  std::vector<double>* neg) {
  const int64_t segments = std::max<int64_t>(1, std::min<int64_t>(64, s.rows));
  const int64_t per = (s.rows + segments - 1) / segments;
  std::vector<double> part(static_cast<size_t>(segments) * s.L, 0.0);
  const at::Tensor tc = t.contiguous();
  const BceLabelSumsFn fn = kernels().bce_label_sums[dtype_index(tc.scalar_type())];
  at::parallel_for(0, segments, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      fn(tc.data_ptr(), s.L, g * per, std::min(s.rows, (g + 1) * per), part.data() + g * s.L);
    }
  });
  pos->assign(s.L, 0.0);
  neg->assign(s.L, 0.0);
  for (int64_t g = 0; g < segments; ++g) {
    const int64_t r1 = std::min(s.rows, (g + 1) * per);
    const double rows_in = static_cast<double>(std::max<int64_t>(0, r1 - g * per));
    for (int64_t l = 0; l < s.L; ++l) {
      (*pos)[l] += part[g * s.L + l];
      (*neg)[l] += rows_in - part[g * s.L + l];
    }
  }
}

struct BcePlan {
  BceInputs in;
  BceArgs args{};
  at::Tensor neg_period, pos_period;
};

// Folds the per-label static weight, per-label pos_weight and the dynamic weights into the two
// per-label arrays, padded so that a vector may run past the last label (see BceArgs).
BcePlan make_bce_plan(const at::Tensor& input, const at::Tensor& target,
                      const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& pos_weight,
                      const c10::optional<at::Tensor>& sample_weight, const at::Tensor& neg_dyn,
                      const at::Tensor& pos_dyn) {
  BcePlan p;
  p.in = bce_inputs(input, target, weight, pos_weight, sample_weight, neg_dyn, pos_dyn);
  const int64_t L = p.in.shape.L;
  p.args.rows = p.in.shape.rows;
  p.args.L = L;
  p.args.rows_per_chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  p.args.num_chunks = L > 0 ? (p.in.shape.rows + p.args.rows_per_chunk - 1) / p.args.rows_per_chunk : 0;
  auto period = [&](const at::Tensor& label) {  // entry m: the weight of label m % L
    if (!label.defined() || L == 0) return at::Tensor();
    return label.index_select(0, at::arange(L + kLabelPad, label.options().dtype(at::kLong)).remainder(L));
  };
  p.neg_period = period(p.in.neg_label);
  p.pos_period = period(p.in.pos_label);
  p.args.input = p.in.x.data_ptr();
  p.args.target = p.in.t.data_ptr();
  p.args.target_float = p.in.t.scalar_type() != p.in.x.scalar_type();  // float32 targets, half input
  p.args.neg_label_w = p.neg_period.defined() ? p.neg_period.data_ptr() : nullptr;
  p.args.pos_label_w = p.pos_period.defined() ? p.pos_period.data_ptr() : nullptr;
  p.args.elem_w = p.in.elem_w.defined() ? p.in.elem_w.data_ptr() : nullptr;
  p.args.elem_pos_w = p.in.elem_pos_w.defined() ? p.in.elem_pos_w.data_ptr() : nullptr;
  p.args.sample_w = p.in.sw.defined() ? p.in.sw.data_ptr() : nullptr;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& sample_weight,
    int64_t reduction, int64_t scheme, double smoothing, double beta, bool balanced, double gamma,
    double alpha, c10::optional<at::ScalarType> loss_dtype) {
  const int di = dtype_index(input.scalar_type());
  const at::ScalarType out_dtype = loss_dtype_of(loss_dtype, input.scalar_type());
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const BceShape s = bce_shape(input, target);
  at::Tensor neg_dyn = at::empty({0}, input.options().dtype(acc));
  at::Tensor pos_dyn = at::empty({0}, input.options().dtype(acc));
  if (scheme != kNoScheme) {
    std::vector<double> npos, nneg;
    label_counts(target, s, &npos, &nneg);
    neg_dyn = at::empty({s.L}, input.options().dtype(acc));
    pos_dyn = at::empty({s.L}, input.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "bce_label_weights", [&] {
      scalar_t* nw = neg_dyn.data_ptr<scalar_t>();
      scalar_t* pw = pos_dyn.data_ptr<scalar_t>();
      for (int64_t l = 0; l < s.L; ++l) {
        pw[l] = static_cast<scalar_t>(scheme_weight(scheme, npos[l], smoothing, beta));
        nw[l] = balanced ? static_cast<scalar_t>(scheme_weight(scheme, nneg[l], smoothing, beta)) : pw[l];
      }
    });
  }
  BcePlan p = make_bce_plan(input, target, weight, pos_weight, sample_weight, neg_dyn, pos_dyn);
  p.args.gamma = gamma;
  p.args.alpha = alpha;
  at::Tensor loss_elems;
  if (reduction == kNone) {
    loss_elems = at::empty(input.sizes(), input.options().dtype(out_dtype));
    p.args.loss_out = loss_elems.data_ptr();
    p.args.loss_out_acc = out_dtype != input.scalar_type();
  }
  std::vector<double> partial(p.args.num_chunks, 0.0);
  if (p.args.num_chunks > 0) {
    const BceForwardFn fn = kernels().bce_forward[di];
    at::parallel_for(0, p.args.num_chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) partial[c] = fn(p.args, c);
    });
  }
  double total = 0;
  for (double v : partial) total += v;
  at::Tensor loss;
  if (reduction == kNone) {
    loss = loss_elems;
  } else {
    const double norm = reduction == kSum ? 1.0 : static_cast<double>(input.numel());
    loss = at::scalar_tensor(total / norm, input.options().dtype(out_dtype));
  }
  return {loss, neg_dyn, pos_dyn};
}

at::Tensor bce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                            const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight,
                            const at::Tensor& neg_label_weight, const at::Tensor& pos_label_weight,
                            int64_t reduction, double gamma, double alpha) {
  const int di = dtype_index(input.scalar_type());
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  BcePlan p = make_bce_plan(input, target, weight, pos_weight, sample_weight, neg_label_weight,
                            pos_label_weight);
  p.args.gamma = gamma;
  p.args.alpha = alpha;
  at::Tensor grad_input = empty_large_output(input.sizes(), input.options());
  at::Tensor grad_elems;
  check_grad_loss(grad_loss, reduction, input.numel());
  if (reduction == kNone) {
    grad_elems = grad_loss.to(acc).contiguous();
    p.args.grad_elems = grad_elems.data_ptr();
  } else {
    double g = grad_loss.to(at::kDouble).item<double>();  // host memory: no device sync
    if (reduction != kSum) g /= static_cast<double>(input.numel());
    p.args.grad_scalar = g;
  }
  p.args.grad_input = grad_input.data_ptr();
  p.args.streaming_stores = grad_input.nbytes() >= (size_t(16) << 20);  // as cross-entropy's
  if (p.args.num_chunks > 0) {
    const BceBackwardFn fn = kernels().bce_backward[di];
    at::parallel_for(0, p.args.num_chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) fn(p.args, c);
    });
  }
  return grad_input;
}

TORCH_LIBRARY_IMPL(fused_wloss, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("cross_entropy_grad_", &cross_entropy_grad_cpu);
  m.impl("cross_entropy_prob_forward", &cross_entropy_prob_forward_cpu);
  m.impl("cross_entropy_prob_backward", &cross_entropy_prob_backward_cpu);
  m.impl("bce_forward", &bce_forward_cpu);
  m.impl("bce_backward", &bce_backward_cpu);
}

}  // namespace cpu
}  // namespace fused_wloss
