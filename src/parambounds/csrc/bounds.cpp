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
// The gradients of all tensors are written into one fresh buffer, and returned as plain
// tensors that share its storage (not views: autograd adopts them as .grad without a
// copy). The work is split over ATen's threads by element count, in fixed blocks, so the
// value does not depend on the number of threads. Nothing is shared between calls.
//
// Vectorized with at::vec: the build defines CPU_CAPABILITY_AVX512 or CPU_CAPABILITY_AVX2
// for the machine it runs on (see _native.py); without either it is the scalar fallback.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

enum PenaltyId : int64_t { kExp = 0, kExpm1 = 1, kQuadratic = 2, kLinear = 3 };

constexpr int64_t kBlock = 1 << 13;  // elements per unit of work

template <typename scalar_t, int64_t P, bool HasLo, bool HasHi>
double segment(const scalar_t* x, scalar_t* g, int64_t n, scalar_t lo, scalar_t hi,
               scalar_t thr) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec zero(0), one(1), minus_one(-1), two(2);
  const Vec vlo(lo), vhi(hi), vthr(thr);
  constexpr int all_zero = (1 << W) - 1;
  Vec acc(0);
  double total = 0;
  int64_t i = 0;
  for (; i < n; i += W) {
    const int64_t count = std::min<int64_t>(W, n - i);
    const Vec vx = count == W ? Vec::loadu(x + i) : Vec::loadu(x + i, count);
    Vec d = zero;
    Vec out = vx.isnan();
    if constexpr (HasHi) {
      const Vec m = vx > vhi;
      d = Vec::blendv(d, vx - vhi, m);
      out = out | m;
    }
    if constexpr (HasLo) {
      const Vec m = vx < vlo;
      d = Vec::blendv(d, vx - vlo, m);
      out = out | m;
    }
    if (out.zero_mask() == all_zero) {  // all inside: no exp, zero gradient
      if (count == W) {
        zero.store(g + i);
      } else {
        zero.store(g + i, count);
      }
      continue;
    }
    d = Vec::blendv(d, vx, vx.isnan());
    const Vec e = d.abs();
    Vec sign = Vec::blendv(zero, one, d > zero);
    sign = Vec::blendv(sign, minus_one, d < zero);
    Vec value, slope;
    if constexpr (P == kExp || P == kExpm1) {
      const Vec capped = at::vec::minimum(e, vthr);
      slope = capped.exp();
      const Vec linear = slope * at::vec::clamp_min(e - vthr, zero);
      if constexpr (P == kExp) {
        // f(0) = 1: count only the elements outside (d != 0 is true for NaN).
        value = Vec::blendv(zero, slope + linear, d != zero);
      } else {
        value = capped.expm1() + linear;
      }
    } else if constexpr (P == kQuadratic) {
      value = e * e;
      slope = two * e;
    } else {
      value = e;
      slope = Vec::blendv(one, e, e.isnan());
    }
    const Vec grad = sign * slope;
    if (count == W) {
      grad.store(g + i);
      acc = acc + value;
    } else {
      grad.store(g + i, count);
      scalar_t lanes[W];
      value.store(lanes);
      for (int64_t k = 0; k < count; ++k) total += lanes[k];
    }
  }
  scalar_t lanes[W];
  acc.store(lanes);
  for (int64_t k = 0; k < W; ++k) total += lanes[k];
  return total;
}

template <typename scalar_t, int64_t P>
using SegmentFn = double (*)(const scalar_t*, scalar_t*, int64_t, scalar_t, scalar_t, scalar_t);

template <typename scalar_t, int64_t P>
SegmentFn<scalar_t, P> pick(bool has_lo, bool has_hi) {
  if (has_lo && has_hi) return segment<scalar_t, P, true, true>;
  if (has_lo) return segment<scalar_t, P, true, false>;
  if (has_hi) return segment<scalar_t, P, false, true>;
  return segment<scalar_t, P, false, false>;
}

template <typename scalar_t, int64_t P>
double run(const std::vector<at::Tensor>& xs, const std::vector<int64_t>& offsets,
           scalar_t* out, bool has_lo, bool has_hi, scalar_t lo, scalar_t hi,
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
          sum += fn(data[j] + local, out + pos, end - pos, lo, hi, thr);
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
                const std::vector<int64_t>& offsets, scalar_t* out, bool has_lo, bool has_hi,
                double lo, double hi, double thr) {
  const auto l = static_cast<scalar_t>(lo), h = static_cast<scalar_t>(hi),
             t = static_cast<scalar_t>(thr);
  switch (penalty) {
    case kExp:
      return run<scalar_t, kExp>(xs, offsets, out, has_lo, has_hi, l, h, t);
    case kExpm1:
      return run<scalar_t, kExpm1>(xs, offsets, out, has_lo, has_hi, l, h, t);
    case kQuadratic:
      return run<scalar_t, kQuadratic>(xs, offsets, out, has_lo, has_hi, l, h, t);
    case kLinear:
      return run<scalar_t, kLinear>(xs, offsets, out, has_lo, has_hi, l, h, t);
    default:
      TORCH_CHECK(false, "parambounds native kernel: unknown penalty id ", penalty);
  }
}

// Returns (cost, buffer, gradients): a 0-d tensor, the flat gradient buffer, and one plain
// tensor per input sharing the buffer's storage.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> value_and_grad(
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
  at::Tensor buffer = at::empty({offsets.back()}, options);
  double sum = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "parambounds_value_and_grad", [&] {
    sum = dispatch<scalar_t>(penalty, xs, offsets, buffer.data_ptr<scalar_t>(),
                             lower.has_value(), upper.has_value(), lower.value_or(0.0),
                             upper.value_or(0.0), threshold);
  });
  std::vector<at::Tensor> grads;
  grads.reserve(xs.size());
  const auto storage = buffer.storage();
  for (size_t j = 0; j < xs.size(); ++j) {
    at::Tensor g = at::empty({0}, options);
    g.set_(storage, offsets[j], xs[j].sizes(), xs[j].strides());
    grads.push_back(std::move(g));
  }
  return {at::scalar_tensor(sum, options), buffer, std::move(grads)};
}

// The report's statistics of one tensor: elements below and above, the largest excess
// (NaN skipped; infinity shown as the dtype's largest value, as torch.nan_to_num does),
// and NaN elements. Branch-free, so that the compiler vectorizes it.
template <typename scalar_t, bool HasLo, bool HasHi>
void stats_one(const scalar_t* x, int64_t n, scalar_t lo, scalar_t hi, double* out) {
  int64_t below = 0, above = 0, nan = 0;
  scalar_t most = 0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = x[i];
    const bool is_above = HasHi && v > hi;
    const bool is_below = HasLo && v < lo;
    above += is_above;
    below += is_below;
    nan += v != v;
    const scalar_t e = is_above ? v - hi : (is_below ? lo - v : scalar_t(0));
    most = e > most ? e : most;
  }
  const scalar_t big = std::numeric_limits<scalar_t>::max();
  out[0] = static_cast<double>(below);
  out[1] = static_cast<double>(above);
  out[2] = static_cast<double>(most > big ? big : most);
  out[3] = static_cast<double>(nan);
}

// Returns a (len(xs), 4) float64 tensor: [below, above, max_excess, nan] per tensor.
at::Tensor stats(const std::vector<at::Tensor>& xs, std::optional<double> lower,
                 std::optional<double> upper) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                "parambounds native kernel: contiguous float32/float64 CPU tensors only");
  }
  const int64_t count = static_cast<int64_t>(xs.size());
  at::Tensor out = at::empty({count, 4}, at::TensorOptions().dtype(at::kDouble));
  double* rows = out.data_ptr<double>();
  const bool has_lo = lower.has_value(), has_hi = upper.has_value();
  at::parallel_for(0, count, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const auto& x = xs[j];
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "parambounds_stats", [&] {
        const auto l = static_cast<scalar_t>(lower.value_or(0.0));
        const auto h = static_cast<scalar_t>(upper.value_or(0.0));
        const scalar_t* p = x.data_ptr<scalar_t>();
        double* r = rows + 4 * j;
        if (has_lo && has_hi) {
          stats_one<scalar_t, true, true>(p, x.numel(), l, h, r);
        } else if (has_lo) {
          stats_one<scalar_t, true, false>(p, x.numel(), l, h, r);
        } else if (has_hi) {
          stats_one<scalar_t, false, true>(p, x.numel(), l, h, r);
        } else {
          stats_one<scalar_t, false, false>(p, x.numel(), l, h, r);
        }
      });
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("value_and_grad", &value_and_grad, "cost and gradients of a group of tensors",
        py::arg("xs"), py::arg("lower"), py::arg("upper"), py::arg("penalty"),
        py::arg("threshold"), py::call_guard<py::gil_scoped_release>());
  m.def("stats", &stats, "the report's statistics of each tensor", py::arg("xs"),
        py::arg("lower"), py::arg("upper"), py::call_guard<py::gil_scoped_release>());
}
