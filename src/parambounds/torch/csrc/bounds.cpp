// The native CPU kernel of parambounds: the cost of a group of tensors that share scalar
// bounds, and its gradient, in one pass over the parameters, read in place.
//
// For each element, with d = x - clamp(x, lower, upper) (positive above, negative below,
// zero inside, NaN for NaN) and e = |d|:
//
//   cost += [d != 0] f(e),     grad = sign(d) f'(e)   (sign(NaN) = 0, so NaN * 0 = NaN)
//
// with f one of the penalty shapes of penalties.py and the same overflow guard (past the
// threshold T, exp and expm1 continue linearly with the slope at T). A parameter of
// +/-inf on an open side is inside (d = 0); beyond a finite bound, d = +/-inf.
//
// Each gradient is written into a storage of its own (as autograd's own gradients: a
// resize_, a torch.save or a deepcopy of one .grad touches that gradient only), which
// comes from a pool of its own (GradientPool: the blocks .grad freed in the last step),
// and returned as a plain tensor (autograd adopts it as .grad without a copy). The work is split over ATen's threads by element
// count, in fixed blocks, so the value does not depend on the number of threads. Calls
// share nothing but the pool (locked).
//
// Vectorized with at::vec: the build defines CPU_CAPABILITY_AVX512 or CPU_CAPABILITY_AVX2
// for the machine it runs on (see _native.py); without either it is the scalar fallback.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <iterator>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>


namespace {

enum PenaltyId : int64_t { kExp = 0, kExpm1 = 1, kQuadratic = 2, kLinear = 3 };

// Elements per unit of work: small enough that the second sweep finds the block's values
// and gradients in L1 (4-8 KiB each). Measured on the benchmark's cases against 8192:
// 1.42x -> 1.15x a plain copy on `many`, 93 -> 62 ms on `large`.
constexpr int64_t kBlock = 1 << 10;

// exp(x) for 0 <= x <= T (T < 88.7 for float32; NaN gives NaN), inline: Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-7 polynomial for exp(r)
// (within 2 ulp of float32's exp; tests compare it with float64). An out-of-line call per
// vector (SLEEF's, what Vectorized::exp is) costs more than the rest of the pass. float64
// keeps Vectorized::exp.
template <typename Vec>
Vec exp_of(const Vec& x) {
  using scalar_t = typename Vec::value_type;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec n = (x * Vec(1.44269504088896341f)).round();
    Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);
    r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
    Vec p(1.9875691500e-4f);
    p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
    p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
    p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
    p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
    p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
    p = at::vec::fmadd(p, r * r, r + Vec(1.0f));
    // 2^n from its bits: (n + 127) << 23, made exactly in float (0 <= n <= 128).
    const auto bits = at::vec::convert_to_int_of_same_size((n + Vec(127.0f)) * Vec(8388608.0f));
    return p * at::vec::cast<float>(bits);
  } else {
    return x.exp();
  }
}

// The lanes of one vector: a mask of those inside (all ones; false for NaN, which is never
// inside), and the cost and gradient of those outside (0 inside).
template <typename scalar_t, int64_t P, bool HasLo, bool HasHi>
struct Lanes {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec zero{0}, one{1}, two{2}, vlo, vhi, vthr;

  Lanes(scalar_t lo, scalar_t hi, scalar_t thr) : vlo(lo), vhi(hi), vthr(thr) {}

  Vec inside(const Vec& vx) const {
    Vec in = vx == vx;
    if constexpr (HasHi) in = in & (vx <= vhi);
    if constexpr (HasLo) in = in & (vx >= vlo);
    return in;
  }

  // The cost and gradient of each lane (0 inside). Lanes not inside are above, below or
  // NaN: there e is the excess (> 0, +inf beyond a finite bound, NaN for NaN). With a
  // bound, a lane is inside exactly where e <= 0 (NaN compares false; an infinite x on
  // an open side gives e = -inf); the gradient takes its sign from x - upper (negative
  // below, as lower <= upper) or the side, as a sign bit on the slope (>= 0 or NaN).
  void outside(const Vec& vx, Vec& value, Vec& grad) const {
    Vec e, in;
    const Vec sign_bit(scalar_t(-0.0));
    if constexpr (HasHi && HasLo) {
      e = at::vec::clamp_min(vx - vhi, vlo - vx);  // max, NaN if vx is NaN
    } else if constexpr (HasHi) {
      e = vx - vhi;
    } else if constexpr (HasLo) {
      e = vlo - vx;
    } else {
      e = vx;  // only NaN is outside
    }
    if constexpr (HasHi || HasLo) {
      in = e <= zero;
    } else {
      in = vx == vx;
    }
    Vec slope;
    if constexpr (P == kExp || P == kExpm1) {
      // clamp_min/clamp_max keep a NaN of their first argument.
      const Vec capped = at::vec::clamp_max(at::vec::clamp_min(e, zero), vthr);
      slope = exp_of(capped);
      const Vec linear = at::vec::clamp_min(e - vthr, zero);  // past T: linear, slope at T
      if constexpr (P == kExp) {
        value = at::vec::fmadd(slope, linear, slope);
      } else {
        value = at::vec::fmadd(slope, linear, capped.expm1());
      }
    } else if constexpr (P == kQuadratic) {
      value = e * e;
      slope = two * e;
    } else {
      value = e;
      slope = Vec::blendv(one, e, e.isnan());
    }
    Vec signed_slope;
    if constexpr (HasHi && HasLo) {
      signed_slope = slope | ((vx - vhi) & sign_bit);
    } else if constexpr (HasLo) {
      signed_slope = slope ^ sign_bit;
    } else {
      signed_slope = slope;
    }
    value = Vec::blendv(value, zero, in);
    grad = Vec::blendv(signed_slope, zero, in);
  }
};

// The cost of x[0, n) (n <= kBlock) and its gradient into g, in two sweeps. The first
// writes a zero gradient everywhere and lists the vectors with a lane outside, without a
// branch; the second computes those, from the cache. One branch per vector ("any lane
// outside?") would be mispredicted whenever a few lanes in ten are outside at random.
// While the second computes, nothing would be read from memory: it asks for the next
// block (the elements after these, in this tensor or at the start of the next one:
// next_x and next_g) ahead, two cache lines of x and two of g per vector computed, so
// that the compute overlaps the loads (measured: 10-15% of the pass when one vector in
// three has a lane outside). Each gradient has a storage of its own, so the memory past
// the end of one is not the next one's. Prefetching reads nothing and never faults.
template <typename scalar_t, int64_t P, bool HasLo, bool HasHi>
double segment(const scalar_t* x, scalar_t* g, int64_t n, scalar_t lo, scalar_t hi,
               scalar_t thr, const scalar_t* next_x_at, const scalar_t* next_g_at) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Lanes<scalar_t, P, HasLo, HasHi> lanes(lo, hi, thr);
  int32_t listed[kBlock / W];
  int64_t count = 0;
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) {
    const Vec vx = Vec::loadu(x + i);
    lanes.zero.store(g + i);
    listed[count] = static_cast<int32_t>(i);
    count += lanes.inside(vx).zero_mask() != 0;
  }
  Vec acc(0), value, grad;
  const char* next_x = reinterpret_cast<const char*>(next_x_at);
  const char* next_g = reinterpret_cast<const char*>(next_g_at);
  constexpr int64_t kLines = kBlock * static_cast<int64_t>(sizeof(scalar_t)) / 64;
  for (int64_t k = 0; k < count; ++k) {
    if (2 * k < kLines) {
      const int64_t at = 128 * k;
      __builtin_prefetch(next_x + at, 0, 3);
      __builtin_prefetch(next_x + at + 64, 0, 3);
      __builtin_prefetch(next_g + at, 1, 3);
      __builtin_prefetch(next_g + at + 64, 1, 3);
    }
    const int64_t i = listed[k];
    const Vec vx = Vec::loadu(x + i);
    lanes.outside(vx, value, grad);
    grad.store(g + i);
    acc = acc + value;
  }
  scalar_t sums[W];
  acc.store(sums);
  double total = 0;
  for (int64_t k = 0; k < W; ++k) total += sums[k];
  if (full < n) {  // the tail: fewer than W lanes
    const int64_t rest = n - full;
    const Vec vx = Vec::loadu(x + full, rest);
    lanes.outside(vx, value, grad);
    grad.store(g + full, rest);
    value.store(sums);
    for (int64_t k = 0; k < rest; ++k) total += sums[k];
  }
  return total;
}

template <typename scalar_t, int64_t P>
using SegmentFn = double (*)(const scalar_t*, scalar_t*, int64_t, scalar_t, scalar_t, scalar_t,
                             const scalar_t*, const scalar_t*);

template <typename scalar_t, int64_t P>
SegmentFn<scalar_t, P> pick(bool has_lo, bool has_hi) {
  if (has_lo && has_hi) return segment<scalar_t, P, true, true>;
  if (has_lo) return segment<scalar_t, P, true, false>;
  if (has_hi) return segment<scalar_t, P, false, true>;
  return segment<scalar_t, P, false, false>;
}

template <typename scalar_t, int64_t P>
double run(const std::vector<at::Tensor>& xs, const std::vector<int64_t>& offsets,
           const std::vector<void*>& outs, bool has_lo, bool has_hi, scalar_t lo, scalar_t hi,
           scalar_t thr) {
  const auto fn = pick<scalar_t, P>(has_lo, has_hi);
  const int64_t total = offsets.back();
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  std::vector<const scalar_t*> data(xs.size());
  for (size_t j = 0; j < xs.size(); ++j) data[j] = xs[j].data_ptr<scalar_t>();
  // At least 64K elements per thread: below that, threads cost more than they save.
  at::parallel_for(0, blocks, (1 << 16) / kBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock, stop = std::min(total, start + kBlock);
      // The tensor holding element `start`, then each tensor overlapping the block.
      size_t j = std::upper_bound(offsets.begin(), offsets.end(), start) - offsets.begin() - 1;
      double sum = 0;
      for (int64_t pos = start; pos < stop; ++j) {
        const int64_t end = std::min(stop, offsets[j + 1]);
        if (end > pos) {
          const int64_t local = pos - offsets[j];
          const scalar_t* x = data[j] + local;
          scalar_t* g = static_cast<scalar_t*>(outs[j]) + local;
          const int64_t n = end - pos;
          // What the next block reads first: the rest of this tensor, or the next one.
          const bool last = end == offsets[j + 1] && j + 1 < data.size();
          const scalar_t* next_x = last ? data[j + 1] : x + n;
          const scalar_t* next_g = last ? static_cast<const scalar_t*>(outs[j + 1]) : g + n;
          sum += fn(x, g, n, lo, hi, thr, next_x, next_g);
        }
        pos = std::max(pos, end);
      }
      partial[static_cast<size_t>(b)] = sum;
    }
  });
  double sum = 0;
  for (double p : partial) sum += p;
  return sum;
}

template <typename scalar_t>
double dispatch(int64_t penalty, const std::vector<at::Tensor>& xs,
                const std::vector<int64_t>& offsets, const std::vector<void*>& outs,
                bool has_lo, bool has_hi,
                double lo, double hi, double thr) {
  const auto l = static_cast<scalar_t>(lo), h = static_cast<scalar_t>(hi),
             t = static_cast<scalar_t>(thr);
  switch (penalty) {
    case kExp:
      return run<scalar_t, kExp>(xs, offsets, outs, has_lo, has_hi, l, h, t);
    case kExpm1:
      return run<scalar_t, kExpm1>(xs, offsets, outs, has_lo, has_hi, l, h, t);
    case kQuadratic:
      return run<scalar_t, kQuadratic>(xs, offsets, outs, has_lo, has_hi, l, h, t);
    case kLinear:
      return run<scalar_t, kLinear>(xs, offsets, outs, has_lo, has_hi, l, h, t);
    default:
      TORCH_CHECK(false, "parambounds native kernel: unknown penalty id ", penalty);
  }
}

// The gradients' storages come from a pool of their own. Fresh memory costs a page fault
// per 4 KiB on first touch, which on a virtual machine costs more than the pass itself;
// the C library's heap returns large blocks to the system or keeps them depending on the
// order of earlier frees, so whether a step faults was a matter of luck (0 or 16 MiB of
// faults a step on `large`, the whole 400 MB in the first three steps). The pool keeps
// the blocks that autograd's .grad tensors free (zero_grad, or after accumulating) and
// hands them out again in the next step.
//
// It never holds more free bytes than the most it has ever had handed out at once (the
// high-water mark: one step's gradients), and a request it cannot serve from a block of
// that size first frees cached blocks of other sizes until what is in use plus what is
// cached plus the request fits under that mark, so a model of other sizes takes the
// place of the last one. empty_cache() frees every cached block. (Asking for huge pages,
// MADV_HUGEPAGE, made the first step on `large` 1.6-2x slower here: the kernel compacts
// memory to find them.)
class GradientPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* data = nbytes == 0 ? nullptr : take(nbytes);
    return {data, data, &GradientPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &GradientPool::give_back; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static GradientPool& get() {
    static GradientPool* pool = new GradientPool;  // never destroyed: frees may come late
    return *pool;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> hold(mutex_);
    for (auto& entry : free_) {
      for (void* data : entry.second) release(data);
    }
    free_.clear();
    cached_ = 0;
    high_ = live_;
  }

  std::tuple<int64_t, int64_t, int64_t> usage() {
    std::lock_guard<std::mutex> hold(mutex_);
    return {static_cast<int64_t>(live_), static_cast<int64_t>(cached_),
            static_cast<int64_t>(high_)};
  }

 private:
  static size_t rounded(size_t nbytes) { return (nbytes + 63) & ~size_t{63}; }

  void* take(size_t nbytes) {
    const size_t size = rounded(nbytes);
    std::lock_guard<std::mutex> hold(mutex_);
    void* data = nullptr;
    auto found = free_.find(size);
    if (found != free_.end() && !found->second.empty()) {
      data = found->second.back();
      found->second.pop_back();
      cached_ -= size;
    } else {
      for (auto it = free_.begin(); it != free_.end() && cached_ > 0 &&
                                    live_ + cached_ + size > high_;) {
        while (!it->second.empty() && live_ + cached_ + size > high_) {
          release(it->second.back());
          it->second.pop_back();
          cached_ -= it->first;
        }
        it = it->second.empty() ? free_.erase(it) : std::next(it);
      }
      data = fresh(size);
      sizes_[data] = size;
    }
    live_ += size;
    high_ = std::max(high_, live_);
    return data;
  }

  static void* fresh(size_t size) {
    void* data = nullptr;
#ifdef _WIN32
    data = _aligned_malloc(size, 64);
#else
    if (posix_memalign(&data, 64, size) != 0) data = nullptr;
#endif
    TORCH_CHECK(data != nullptr, "parambounds native kernel: out of memory (", size,
                " bytes for gradients)");
    return data;
  }

  void release(void* data) {
    sizes_.erase(data);
#ifdef _WIN32
    _aligned_free(data);
#else
    std::free(data);
#endif
  }

  static void give_back(void* data) {
    if (data != nullptr) get().put(data);
  }

  void put(void* data) {
    std::lock_guard<std::mutex> hold(mutex_);
    const size_t size = sizes_.at(data);
    live_ -= size;
    if (cached_ + size <= high_) {
      free_[size].push_back(data);
      cached_ += size;
    } else {
      release(data);
    }
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // cached blocks, by size
  std::unordered_map<void*, size_t> sizes_;              // every block's size
  size_t live_ = 0, cached_ = 0, high_ = 0;
};

// A tensor of `sizes` and `strides` at `offset` (elements) in `storage`: a plain tensor,
// not a view, made without the dispatcher (at::empty + set_ cost ~1.5 us a tensor).
at::Tensor on_storage(const c10::Storage& storage, caffe2::TypeMeta dtype, int64_t offset,
                      at::IntArrayRef sizes, at::IntArrayRef strides) {
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
      c10::Storage(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
  t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, offset);
  return t;
}

// Returns (cost, gradients): a 0-d tensor and one plain tensor per input (not a view),
// each on a storage of its own from the pool.
std::tuple<at::Tensor, std::vector<at::Tensor>> value_and_grad(
    const std::vector<at::Tensor>& xs, std::optional<double> lower,
    std::optional<double> upper, int64_t penalty, double threshold) {
  TORCH_CHECK(!xs.empty(), "parambounds native kernel: no tensors");
  const auto dtype = xs[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "parambounds native kernel: float32 or float64 only");
  std::vector<int64_t> offsets{0};
  offsets.reserve(xs.size() + 1);
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.is_contiguous(),
                "parambounds native kernel: contiguous CPU tensors of one dtype only");
    offsets.push_back(offsets.back() + x.numel());
  }
  const auto options = xs[0].options().requires_grad(false);
  const auto meta = xs[0].dtype();
  const int64_t item = static_cast<int64_t>(xs[0].element_size());
  GradientPool& pool = GradientPool::get();
  std::vector<at::Tensor> grads;
  std::vector<void*> outs(xs.size());
  grads.reserve(xs.size());
  for (size_t j = 0; j < xs.size(); ++j) {
    const size_t nbytes = static_cast<size_t>((offsets[j + 1] - offsets[j]) * item);
    // Resizable, with the pool as its allocator: a resize_ of a gradient works as usual.
    c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, pool.allocate(nbytes), &pool,
                         /*resizable=*/true);
    outs[j] = storage.mutable_data();
    grads.push_back(on_storage(storage, meta, 0, xs[j].sizes(), xs[j].strides()));
  }
  double sum = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "parambounds_value_and_grad", [&] {
    sum = dispatch<scalar_t>(penalty, xs, offsets, outs, lower.has_value(), upper.has_value(),
                             lower.value_or(0.0), upper.value_or(0.0), threshold);
  });
  return {at::scalar_tensor(sum, options), std::move(grads)};
}

// Scales the gradients in place by the incoming gradient (skipped when it is exactly 1),
// in one parallel pass over all of them (a multiply per tensor through the dispatcher
// costs ~2 us each). Inside the bounds a gradient is exactly 0 whatever comes from above:
// a non-finite incoming gradient (cost * inf, or NaN) scales only the elements outside
// (0 * inf would be NaN), as the masked sum of Rockpool's cost does.
// g[0, n) *= factor, except the zeros (inside), which stay 0; NaN stays NaN.
template <typename scalar_t>
void scale_piece(scalar_t* g, int64_t n, scalar_t factor) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vf(factor), zero(0);
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) {
    const Vec v = Vec::loadu(g + i);
    Vec::blendv(v * vf, zero, v == zero).store(g + i);
  }
  if (full < n) {
    const Vec v = Vec::loadu(g + full, n - full);
    Vec::blendv(v * vf, zero, v == zero).store(g + full, n - full);
  }
}

template <typename scalar_t>
void scale_all(const std::vector<at::Tensor>& grads, scalar_t factor) {
  std::vector<int64_t> offsets{0};
  std::vector<scalar_t*> data;
  for (const auto& g : grads) {
    offsets.push_back(offsets.back() + g.numel());
    data.push_back(g.data_ptr<scalar_t>());
  }
  const int64_t total = offsets.back();
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, (1 << 16) / kBlock, [&](int64_t b0, int64_t b1) {
    const int64_t start = b0 * kBlock, stop = std::min(total, b1 * kBlock);
    size_t j = std::upper_bound(offsets.begin(), offsets.end(), start) - offsets.begin() - 1;
    for (int64_t pos = start; pos < stop; ++j) {
      const int64_t end = std::min(stop, offsets[j + 1]);
      if (end > pos) scale_piece(data[j] + (pos - offsets[j]), end - pos, factor);
      pos = std::max(pos, end);
    }
  });
}

void scale_(std::vector<at::Tensor>& grads, const at::Tensor& grad_out) {
  if (grads.empty()) return;
  if (!grad_out.device().is_cpu()) {  // not a CPU cost: never the native kernel's
    for (auto& g : grads) {
      const at::Tensor inside = g.eq(0);
      g.mul_(grad_out).masked_fill_(inside, 0);
    }
    return;
  }
  const double factor = grad_out.item<double>();
  if (factor == 1.0) return;
  AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "parambounds_scale", [&] {
    scale_all<scalar_t>(grads, static_cast<scalar_t>(factor));
  });
}

// The differentiable gradients for backward(create_graph=True): a Python function that
// parambounds._kernels sets once, called with (xs, needs, grad_out, lower, upper,
// penalty) and returning one gradient (or None) per tensor. Never destroyed: a
// py::object destroyed after the interpreter has finalised would crash the exit.
py::object* differentiable_fn = nullptr;

void set_differentiable(py::object fn) {
  if (differentiable_fn == nullptr) differentiable_fn = new py::object();
  *differentiable_fn = std::move(fn);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The cost of a group as an autograd node of its own (no Python in forward or backward):
// the gradients computed in the forward pass are handed to autograd in the backward pass
// (and dropped here, so that it adopts them as .grad without a copy), scaled in place when
// the incoming gradient is not 1. A second backward (retain_graph=True) computes them
// again from the saved parameters; backward(create_graph=True) asks the Python function
// above for differentiable ones.
struct GroupCost : public torch::autograd::Function<GroupCost> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList xs, std::optional<double> lower,
                            std::optional<double> upper, int64_t penalty, double threshold) {
    auto [value, grads] = value_and_grad(xs.vec(), lower, upper, penalty, threshold);
    // The parameters and their versions, for a second or a differentiable backward only:
    // as saved variables, packing and unpacking 250 of them cost ~0.1 ms a step.
    std::vector<int64_t> versions;
    versions.reserve(xs.size());
    // (Inference tensors have no version, and never need a backward: -1.)
    for (const auto& x : xs) versions.push_back(x.is_inference() ? -1 : x._version());
    ctx->saved_data["xs"] = xs.vec();
    // One saved variable, which autograd frees after a backward without retain_graph:
    // a second backward then fails with autograd's own message.
    ctx->save_for_backward({xs[0]});
    ctx->saved_data["versions"] = std::move(versions);
    ctx->saved_data["grads"] = std::move(grads);
    ctx->saved_data["lower"] = lower;
    ctx->saved_data["upper"] = upper;
    ctx->saved_data["penalty"] = penalty;
    ctx->saved_data["threshold"] = threshold;
    return value;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor grad_out = grad_outputs[0];
    ctx->get_saved_variables();  // raises if backward went through this graph already
    const size_t n = ctx->saved_data["xs"].toListRef().size();
    // The parameters, checked against their versions at the forward (as autograd checks
    // saved variables), for the paths that read them.
    const auto parameters = [&]() {
      std::vector<at::Tensor> xs = ctx->saved_data["xs"].toTensorVector();
      const auto versions = ctx->saved_data["versions"].toIntVector();
      for (size_t i = 0; i < n; ++i) {
        TORCH_CHECK(versions[i] < 0 || xs[i]._version() == versions[i],
                    "parambounds: one of the parameters needed to compute the bounds cost's "
                    "gradient has been modified by an inplace operation (tensor ", i,
                    " of its group is at version ", xs[i]._version(), "; expected version ",
                    versions[i], ")");
      }
      return xs;
    };
    const auto lower = ctx->saved_data["lower"].toOptional<double>();
    const auto upper = ctx->saved_data["upper"].toOptional<double>();
    const int64_t penalty = ctx->saved_data["penalty"].toInt();
    std::vector<at::Tensor> grads;
    auto found = ctx->saved_data.find("grads");
    if (found != ctx->saved_data.end()) {
      grads = found->second.toTensorVector();
      ctx->saved_data.erase("grads");
    }
    variable_list out(n + 4);  // one per tensor, then lower, upper, penalty, threshold
    if (at::GradMode::is_enabled()) {
      TORCH_CHECK(differentiable_fn != nullptr,
                  "parambounds native kernel: no differentiable backward was set");
      grads.clear();
      py::gil_scoped_acquire gil;
      py::list needs;
      for (size_t i = 0; i < n; ++i) needs.append(ctx->needs_input_grad(i));
      const auto xs = parameters();
      const auto got = (*differentiable_fn)(xs, needs, grad_out, lower, upper, penalty)
                           .cast<std::vector<std::optional<at::Tensor>>>();
      TORCH_CHECK(got.size() == n, "parambounds native kernel: wrong number of gradients");
      for (size_t i = 0; i < n; ++i) {
        if (got[i].has_value()) out[i] = *got[i];
      }
      return out;
    }
    if (grads.empty()) {  // a second backward with retain_graph=True: compute again
      auto again = value_and_grad(parameters(), lower, upper, penalty,
                                  ctx->saved_data["threshold"].toDouble());
      grads = std::move(std::get<1>(again));
    }
    scale_(grads, grad_out);
    for (size_t i = 0; i < n; ++i) {
      if (ctx->needs_input_grad(i)) out[i] = std::move(grads[i]);
    }
    return out;
  }
};

at::Tensor group_cost(const std::vector<at::Tensor>& xs, std::optional<double> lower,
                      std::optional<double> upper, int64_t penalty, double threshold) {
  return GroupCost::apply(at::TensorList(xs), lower, upper, penalty, threshold);
}

// The report's statistics of x[0, n): elements below and above, the largest excess (NaN
// skipped; infinity shown as the dtype's largest value, as torch.nan_to_num does, when
// the rows are finished), and NaN elements, into out[0..4). Counted in the lanes of a
// vector (exact: n <= kStatsBlock, so a lane counts at most 2^16 / W < 2^24).
constexpr int64_t kStatsBlock = 1 << 16;

template <typename scalar_t, bool HasLo, bool HasHi>
void stats_piece(const scalar_t* x, int64_t n, scalar_t lo, scalar_t hi, double* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vlo(lo), vhi(hi), zero(0), one(1);
  Vec below(0), above(0), nan(0), most(0);
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) {
    const Vec vx = Vec::loadu(x + i);
    Vec e = zero;  // 0 inside and for NaN (every comparison with NaN is false)
    if constexpr (HasHi) {
      const Vec up = vx > vhi;
      above = above + (up & one);
      e = Vec::blendv(e, vx - vhi, up);
    }
    if constexpr (HasLo) {
      const Vec down = vx < vlo;
      below = below + (down & one);
      e = Vec::blendv(e, vlo - vx, down);
    }
    nan = nan + ((vx != vx) & one);
    most = Vec::blendv(most, e, e > most);
  }
  scalar_t lanes[4][W];
  below.store(lanes[0]);
  above.store(lanes[1]);
  most.store(lanes[2]);
  nan.store(lanes[3]);
  double counts[3] = {0, 0, 0};
  scalar_t top = 0;
  for (int64_t k = 0; k < W; ++k) {
    counts[0] += lanes[0][k];
    counts[1] += lanes[1][k];
    counts[2] += lanes[3][k];
    top = lanes[2][k] > top ? lanes[2][k] : top;
  }
  for (int64_t i = full; i < n; ++i) {  // the tail: fewer than W values
    const scalar_t v = x[i];
    const bool is_above = HasHi && v > hi;
    const bool is_below = HasLo && v < lo;
    counts[1] += is_above;
    counts[0] += is_below;
    counts[2] += v != v;
    const scalar_t e = is_above ? v - hi : (is_below ? lo - v : scalar_t(0));
    top = e > top ? e : top;
  }
  out[0] = counts[0];
  out[1] = counts[1];
  out[2] = static_cast<double>(top);
  out[3] = counts[2];
}

// Returns a (len(xs), 4) float64 tensor: [below, above, max_excess, nan] per tensor. The
// tensors are split into pieces by element count, as the cost is (a few large tensors
// and many small ones keep every thread busy), and the pieces' rows summed per tensor.
at::Tensor stats(const std::vector<at::Tensor>& xs, std::optional<double> lower,
                 std::optional<double> upper) {
  std::vector<int64_t> offsets{0};
  offsets.reserve(xs.size() + 1);
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                "parambounds native kernel: contiguous float32/float64 CPU tensors only");
    offsets.push_back(offsets.back() + x.numel());
  }
  const int64_t count = static_cast<int64_t>(xs.size());
  const int64_t total = offsets.back();
  const int64_t blocks = (total + kStatsBlock - 1) / kStatsBlock;
  // The pieces of each block: (tensor, start, stop) within the tensor, in order.
  struct Piece {
    int64_t j, start, stop;
  };
  std::vector<Piece> pieces;
  std::vector<int64_t> first{0};  // pieces of block b: [first[b], first[b + 1])
  pieces.reserve(static_cast<size_t>(blocks + count));
  first.reserve(static_cast<size_t>(blocks + 1));
  int64_t j = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kStatsBlock, stop = std::min(total, start + kStatsBlock);
    while (offsets[j + 1] <= start) ++j;
    for (int64_t k = j; k < count && offsets[k] < stop; ++k) {
      const int64_t lo = std::max(start, offsets[k]), hi = std::min(stop, offsets[k + 1]);
      if (hi > lo) pieces.push_back({k, lo - offsets[k], hi - offsets[k]});
    }
    first.push_back(static_cast<int64_t>(pieces.size()));
  }
  std::vector<double> rows_of(pieces.size() * 4, 0.0);
  const bool has_lo = lower.has_value(), has_hi = upper.has_value();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t p = first[b0]; p < first[b1]; ++p) {
      const Piece& piece = pieces[static_cast<size_t>(p)];
      const auto& x = xs[static_cast<size_t>(piece.j)];
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "parambounds_stats", [&] {
        const auto l = static_cast<scalar_t>(lower.value_or(0.0));
        const auto h = static_cast<scalar_t>(upper.value_or(0.0));
        const scalar_t* data = x.data_ptr<scalar_t>() + piece.start;
        const int64_t n = piece.stop - piece.start;
        double* r = rows_of.data() + 4 * p;
        if (has_lo && has_hi) {
          stats_piece<scalar_t, true, true>(data, n, l, h, r);
        } else if (has_lo) {
          stats_piece<scalar_t, true, false>(data, n, l, h, r);
        } else if (has_hi) {
          stats_piece<scalar_t, false, true>(data, n, l, h, r);
        } else {
          stats_piece<scalar_t, false, false>(data, n, l, h, r);
        }
      });
    }
  });
  at::Tensor out = at::zeros({count, 4}, at::TensorOptions().dtype(at::kDouble));
  double* rows = out.data_ptr<double>();
  for (size_t p = 0; p < pieces.size(); ++p) {
    double* r = rows + 4 * pieces[p].j;
    const double* got = rows_of.data() + 4 * p;
    r[0] += got[0];
    r[1] += got[1];
    r[2] = std::max(r[2], got[2]);
    r[3] += got[3];
  }
  for (int64_t k = 0; k < count; ++k) {  // an infinite excess: the dtype's largest value
    const double big = xs[static_cast<size_t>(k)].scalar_type() == at::kFloat
                           ? static_cast<double>(std::numeric_limits<float>::max())
                           : std::numeric_limits<double>::max();
    rows[4 * k + 2] = std::min(rows[4 * k + 2], big);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("value_and_grad", &value_and_grad, "cost and gradients of a group of tensors",
        py::arg("xs"), py::arg("lower"), py::arg("upper"), py::arg("penalty"),
        py::arg("threshold"), py::call_guard<py::gil_scoped_release>());
  m.def("cost", &group_cost,
        "cost of a group of tensors, with its own autograd node (gradients from the forward)",
        py::arg("xs"), py::arg("lower"), py::arg("upper"), py::arg("penalty"),
        py::arg("threshold"), py::call_guard<py::gil_scoped_release>());
  m.def("set_differentiable", &set_differentiable,
        "the Python function that computes differentiable gradients (create_graph=True)");
  m.def("stats", &stats, "the report's statistics of each tensor", py::arg("xs"),
        py::arg("lower"), py::arg("upper"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "empty_cache", [] { GradientPool::get().empty_cache(); },
      "free the gradient buffers the pool keeps for the next step");
  m.def(
      "pool_usage", [] { return GradientPool::get().usage(); },
      "(bytes of gradients in use, bytes kept for the next step, the most ever in use)");
}
