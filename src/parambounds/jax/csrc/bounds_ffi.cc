// The bounds cost and its gradient for JAX on the CPU: an XLA FFI handler.
//
// One call takes a group of arrays of one float dtype that share a kind of bounds per
// array, and computes in one pass over each array its summed penalty and its gradient:
//
//   e_i = max(x_i - u, l - x_i)      (an open side's gap is -inf)
//   cost = sum_i [not (e_i <= 0)] f(e_i),   grad_i = +-f'(e_i) outside, exactly 0 inside
//
// with f the penalty (0 exp, 1 expm1, 2 quadratic, 3 linear) continued linearly past the
// overflow threshold t for the exponentials, as parambounds.penalties defines them.
// NaN in x gives NaN in the cost and in its gradient. The cost of each array is summed
// in double and returned in the array's dtype.
//
// Arguments: bounds (2 n values of the dtype: l_0, u_0, l_1, u_1, ...), then x_0..x_{n-1}.
// Results: costs (n values of the dtype), then, when `grad` is set, g_0..g_{n-1}.
// Attributes: sides (n values: bit 0 lower bound present, bit 1 upper), penalty, grad,
// threshold (t, in double).
//
// Each array goes in blocks of 1024 values: a first sweep writes a zero gradient and
// lists the vectors that hold a value outside (no branch), a second computes those (the
// float32 exponential vectorised, within 2 ulp), while the block is still in L1.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
#include <vector>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__) || defined(__SSE__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 1024;

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
  static constexpr int width = 4;
};

template <typename M>
inline bool any_lane(M m) {
#ifdef __AVX__
  __m256i v;
  std::memcpy(&v, &m, sizeof(v));
  return !_mm256_testz_si256(v, v);
#else
  constexpr int w = sizeof(M) / sizeof(m[0]);
  bool r = false;
  for (int k = 0; k < w; ++k) r |= m[k] != 0;
  return r;
#endif
}

// The larger gap of one value; NaN when x is NaN.
template <typename T, bool LO, bool HI>
inline T excess(T x, T l, T u) {
  if (LO && HI) {
    T above = x - u, below = l - x;
    return above >= below ? above : below;
  }
  return HI ? x - u : l - x;
}

// f(e) and f'(e) of one value outside (e > 0 or NaN).
template <typename T>
inline T penalty(int p, T e, T t, T* slope) {
  switch (p) {
    case 0:
    case 1: {
      T c = e > t ? t : e;  // NaN stays NaN
      T s = std::exp(c);
      T over = (e - t) > T(0) ? e - t : T(0);
      *slope = s;
      return (p == 0 ? s : std::expm1(c)) + s * over;
    }
    case 2:
      *slope = T(2) * e;
      return e * e;
    default:
      *slope = e != e ? e : T(1);
      return e;
  }
}

// exp(c) for 0 <= c <= 88 (or NaN), 8 float lanes: 2^n exp(r), |r| <= ln2 / 2.
inline Vec<float>::type exp8(Vec<float>::type c) {
  typedef Vec<float>::type V;
  typedef Vec<float>::mask M;
  const V log2e = V{} + 1.44269504088896341f;
  const V ln2_hi = V{} + 0.693359375f;
  const V ln2_lo = V{} + -2.12194440e-4f;
  V n = c * log2e + 0.5f;
  M ni = __builtin_convertvector(n, M);  // truncation: n >= 0 here
  n = __builtin_convertvector(ni, V);
  V r = c - n * ln2_hi;
  r = r - n * ln2_lo;
  // Taylor to r^7 / 7!: relative error below 1e-8 on |r| <= 0.35.
  V p = V{} + 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  M bits = (ni + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  V out = p * scale;
  // NaN lanes: c != c.
  M nan = c != c;
  M ob, cb;
  std::memcpy(&ob, &out, sizeof(ob));
  std::memcpy(&cb, &c, sizeof(cb));
  ob = (ob & ~nan) | (cb & nan);
  std::memcpy(&out, &ob, sizeof(out));
  return out;
}

inline Vec<float>::type vexp(Vec<float>::type c) { return exp8(c); }
inline Vec<double>::type vexp(Vec<double>::type c) {  // not used: float64 goes lane by lane
  for (int q = 0; q < 4; ++q) c[q] = std::exp(c[q]);
  return c;
}

// One array (or a piece of one): its summed penalty, and with STORE its gradient.
template <typename T, bool LO, bool HI, bool STORE>
double leaf(const T* x, T* g, int64_t n, T l, T u, int p, T t) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::mask M;
  constexpr int W = Vec<T>::width;
  constexpr bool is_float = std::is_same<T, float>::value;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  double total = 0.0;
  V acc = V{};
  const V lv = V{} + l, uv = V{} + u, tv = V{} + t, zero = V{}, two = V{} + T(2);
  const int64_t nv = n / W;
  int list[kBlock / W];
  for (int64_t b0 = 0; b0 < nv; b0 += kBlock / W) {
    const int64_t b1 = std::min<int64_t>(nv, b0 + kBlock / W);
    int k = 0;
    // First sweep: a zero gradient, and the list of vectors with a value outside.
    for (int64_t j = b0; j < b1; ++j) {
      V xv;
      std::memcpy(&xv, x + j * W, sizeof(V));
      V e;  // NaN where x is NaN
      if (LO && HI) {
        V above = xv - uv, below = lv - xv;
        e = above >= below ? above : below;
      } else {
        e = HI ? xv - uv : lv - xv;
      }
      M out = !(e <= zero);
      if (STORE) std::memcpy(g + j * W, &zero, sizeof(V));
      list[k] = static_cast<int>(j - b0);
      k += any_lane(out);
    }
    // Second sweep: the listed vectors, still in L1.
    for (int i = 0; i < k; ++i) {
      const int64_t j = b0 + list[i];
      V xv;
      std::memcpy(&xv, x + j * W, sizeof(V));
      V e;
      M up;  // the upper side is the larger gap
      if (LO && HI) {
        V above = xv - uv, below = lv - xv;
        up = above >= below;
        e = up ? above : below;
      } else {
        e = HI ? xv - uv : lv - xv;
        up = HI ? M(zero == zero) : M(zero != zero);
      }
      M out = !(e <= zero);
      V v, s;
      if ((is_float && p == 0) || p == 2 || p == 3) {
        if (p == 0) {
          V c = e > tv ? tv : e;  // NaN stays NaN
          s = vexp(out ? c : zero);
          V over = (e - tv) > zero ? e - tv : zero;
          v = s + s * over;
        } else if (p == 2) {
          v = e * e;
          s = two * e;
        } else {
          v = e;
          s = e != e ? e : zero + T(1);
        }
      } else {  // the other exponentials lane by lane
        for (int q = 0; q < W; ++q) {
          T sq = T(0);
          v[q] = out[q] ? penalty<T>(p, e[q], t, &sq) : T(0);
          s[q] = sq;
        }
      }
      acc += out ? v : zero;
      if (STORE) {
        V gv = up ? s : -s;
        gv = out ? gv : zero;
        std::memcpy(g + j * W, &gv, sizeof(V));
      }
    }
    for (int q = 0; q < W; ++q) total += static_cast<double>(acc[q]);
    acc = V{};
  }
  for (int64_t idx = nv * W; idx < n; ++idx) {
    T e = excess<T, LO, HI>(x[idx], l, u);
    if (STORE) g[idx] = T(0);
    if (e <= T(0)) continue;
    T s;
    total += static_cast<double>(penalty<T>(p, e, t, &s));
    T above = HI ? x[idx] - u : neg_inf;
    T below = LO ? l - x[idx] : neg_inf;
    if (STORE) g[idx] = above >= below ? s : -s;
  }
  return total;
}

template <typename T>
double one(const T* x, T* g, int64_t n, T l, T u, int64_t sides, int p, T t) {
  if (g == nullptr) {
    switch (sides) {
      case 1: return leaf<T, true, false, false>(x, g, n, l, u, p, t);
      case 2: return leaf<T, false, true, false>(x, g, n, l, u, p, t);
      case 3: return leaf<T, true, true, false>(x, g, n, l, u, p, t);
      default: return 0.0;
    }
  }
  switch (sides) {
    case 1: return leaf<T, true, false, true>(x, g, n, l, u, p, t);
    case 2: return leaf<T, false, true, true>(x, g, n, l, u, p, t);
    case 3: return leaf<T, true, true, true>(x, g, n, l, u, p, t);
    default:
      std::memset(g, 0, sizeof(T) * n);
      return 0.0;
  }
}

// Elements per piece of work: pieces of large arrays go to XLA's intra-op threads.
constexpr int64_t kPiece = 1 << 16;

// The pieces of one call, shared with the pool's tasks (which may start after the call
// has finished: they then find no piece left, and the shared_ptr keeps this alive).
template <typename T>
struct Work {
  struct Piece {
    const T* x;
    T* g;
    int64_t n;
    int64_t leaf;
  };
  std::vector<Piece> pieces;
  std::vector<double> results;
  std::vector<T> lo, hi;
  std::vector<int64_t> sides;
  int p = 0;
  T t = T(0);
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
#ifdef __SSE__
  unsigned csr = 0;  // the calling thread's floating-point mode (XLA flushes subnormals)
#endif

  void run() {
#ifdef __SSE__
    const unsigned old = _mm_getcsr();
    _mm_setcsr(csr);  // every thread computes as the calling one: the same answer
#endif
    work();
#ifdef __SSE__
    _mm_setcsr(old);
#endif
  }

  void work() {
    for (;;) {
      const int64_t k = next.fetch_add(1, std::memory_order_relaxed);
      if (k >= static_cast<int64_t>(pieces.size())) return;
      const Piece& w = pieces[k];
      results[k] = one<T>(w.x, w.g, w.n, lo[w.leaf], hi[w.leaf], sides[w.leaf], p, t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename T>
ffi::Error run(ffi::ThreadPool pool, ffi::AnyBuffer bounds, ffi::RemainingArgs xs,
               ffi::RemainingRets rets, ffi::Span<const int64_t> sides, int64_t p,
               int64_t grad, double threshold) {
  const size_t n = xs.size();
  if (sides.size() != n || bounds.element_count() != 2 * n ||
      rets.size() != (grad ? n + 1 : 1)) {
    return ffi::Error::InvalidArgument("parambounds: arguments do not match");
  }
  auto costs_or = rets.get<ffi::AnyBuffer>(0);
  if (!costs_or.has_value()) return costs_or.error();
  T* costs = (*costs_or)->template typed_data<T>();
  const T* b = bounds.typed_data<T>();
  auto work = std::make_shared<Work<T>>();
  work->p = static_cast<int>(p);
#ifdef __SSE__
  work->csr = _mm_getcsr();
#endif
  work->t = static_cast<T>(threshold);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    auto x = xs.get<ffi::AnyBuffer>(i);
    if (!x.has_value()) return x.error();
    T* g = nullptr;
    if (grad) {
      auto r = rets.get<ffi::AnyBuffer>(i + 1);
      if (!r.has_value()) return r.error();
      g = (*r)->template typed_data<T>();
    }
    work->lo.push_back(b[2 * i]);
    work->hi.push_back(b[2 * i + 1]);
    work->sides.push_back(sides[i]);
    const T* data = x->template typed_data<T>();
    const int64_t size = static_cast<int64_t>(x->element_count());
    total += size;
    for (int64_t at = 0; at < size || at == 0; at += kPiece) {
      const int64_t len = std::min(kPiece, size - at);
      work->pieces.push_back({data + at, g == nullptr ? nullptr : g + at, len,
                              static_cast<int64_t>(i)});
      if (size == 0) break;
    }
  }
  const int64_t count = static_cast<int64_t>(work->pieces.size());
  work->results.assign(count, 0.0);
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), total / (4 * kPiece));  // small calls: inline
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  std::vector<double> sums(n, 0.0);
  for (int64_t k = 0; k < count; ++k) sums[work->pieces[k].leaf] += work->results[k];
  for (size_t i = 0; i < n; ++i) costs[i] = static_cast<T>(sums[i]);
  return ffi::Error::Success();
}

ffi::Error bounds_cost(ffi::ThreadPool pool, ffi::AnyBuffer bounds, ffi::RemainingArgs xs,
                       ffi::RemainingRets rets, ffi::Span<const int64_t> sides, int64_t p,
                       int64_t grad, double threshold) {
  switch (bounds.element_type()) {
    case ffi::DataType::F32:
      return run<float>(pool, bounds, xs, rets, sides, p, grad, threshold);
    case ffi::DataType::F64:
      return run<double>(pool, bounds, xs, rets, sides, p, grad, threshold);
    default:
      return ffi::Error::InvalidArgument("parambounds: float32 or float64 only");
  }
}

// g_i * c_i into out_i (the same buffer when XLA aliased them), 0 where g_i is 0
// whatever c_i is (an infinite or NaN cotangent leaves a value inside its bounds at
// exactly 0). c holds one factor per array, or per array and batch element under vmap
// (c of shape (B, n), each g_i of B equal slices).
template <typename T>
ffi::Error scale_run(ffi::AnyBuffer c, ffi::RemainingArgs gs, ffi::RemainingRets outs) {
  const size_t n = gs.size();
  const int64_t k = static_cast<int64_t>(c.element_count());
  if (outs.size() != n || n == 0 || k % static_cast<int64_t>(n) != 0) {
    return ffi::Error::InvalidArgument("parambounds: scale arguments do not match");
  }
  const int64_t batch = k / static_cast<int64_t>(n);
  const T* f = c.typed_data<T>();
  for (size_t i = 0; i < n; ++i) {
    auto g = gs.get<ffi::AnyBuffer>(i);
    if (!g.has_value()) return g.error();
    auto out = outs.get<ffi::AnyBuffer>(i);
    if (!out.has_value()) return out.error();
    const int64_t size = static_cast<int64_t>(g->element_count());
    if (static_cast<int64_t>((*out)->element_count()) != size || size % batch != 0) {
      return ffi::Error::InvalidArgument("parambounds: scale shapes do not match");
    }
    const int64_t slice = size / batch;
    const T* src = g->template typed_data<T>();
    T* dst = (*out)->template typed_data<T>();
    for (int64_t b = 0; b < batch; ++b) {
      const T s = f[b * static_cast<int64_t>(n) + static_cast<int64_t>(i)];
      const T* from = src + b * slice;
      T* to = dst + b * slice;
      if (s == T(1)) {  // value_and_grad: nothing to do when aliased
        if (from != to) std::memcpy(to, from, sizeof(T) * slice);
        continue;
      }
      for (int64_t j = 0; j < slice; ++j) to[j] = from[j] == T(0) ? T(0) : from[j] * s;
    }
  }
  return ffi::Error::Success();
}

ffi::Error scale(ffi::AnyBuffer c, ffi::RemainingArgs gs, ffi::RemainingRets outs) {
  switch (c.element_type()) {
    case ffi::DataType::F32:
      return scale_run<float>(c, gs, outs);
    case ffi::DataType::F64:
      return scale_run<double>(c, gs, outs);
    default:
      return ffi::Error::InvalidArgument("parambounds: float32 or float64 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ParamboundsScale, scale,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ParamboundsBoundsCost, bounds_cost,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("sides")
                                  .Attr<int64_t>("penalty")
                                  .Attr<int64_t>("grad")
                                  .Attr<double>("threshold"));
