// The CPU's vector math: Lanes for at::vec::Vectorized (cells/common.h's contract), loads and stores of 16-bit
// types as float vectors, the float exp and tanh. Vectorized is real SIMD only when this file is built with a
// CPU_CAPABILITY (setup.py picks AVX512 or AVX2 from the build machine).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_n.h>

#include <type_traits>

#include "cells/common.h"

namespace rnnext {
namespace cells {

// float exp for the cells: Cephes expf instead of Sleef's (Vectorized::exp), which costs more than the cell's
// other math (docs/design.md, "Cells written once").
// n = round(x log2 e), r = x - n ln 2 in two parts (Cody-Waite), a polynomial for e^r, times 2^n: inf and 0
// past the ends, through the subnormals between (the clamp keeps NaN).
inline at::vec::Vectorized<float> exp_fast(at::vec::Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using V = at::vec::Vectorized<float>;
  const V v = at::vec::clamp(x, V(-104.f), V(89.f)), n = (v * V(1.44269504088896341f)).round();
  const V r = at::vec::fmadd(n, V(2.12194440e-4f), at::vec::fmadd(n, V(-0.693359375f), v));
  V p(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = at::vec::fmadd(p, r, V(c));
  p = at::vec::fmadd(p, r * r, r + V(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  // no scalef: 2^n as 2^(n/2) * 2^(n - n/2), each factor a normal float for n in [-150, 128]
  const __m256i k = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(k, 1);
  auto pow2 = [](__m256i e) {
    return V(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)));
  };
  return p * pow2(half) * pow2(_mm256_sub_epi32(k, half));
#endif
#else
  return x.exp();
#endif
}

// float tanh through exp: Sleef's tanh (Vectorized::tanh) costs ~5 exps, and the cells need 1-2 tanh
// per element. 1 - 2/(e^2x + 1), with an odd polynomial near 0 where that form cancels (Cephes
// tanhf coefficients; the accuracy measured: docs/design.md).
inline at::vec::Vectorized<float> tanh_fast(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  const V one(1.f), two(2.f), x2 = x * x;
  V far = one - two / (exp_fast(x * two) + one);
  V p = at::vec::fmadd(V(-5.70498872745e-3f), x2, V(2.06390887954e-2f));
  p = at::vec::fmadd(p, x2, V(-5.37397155531e-2f));
  p = at::vec::fmadd(p, x2, V(1.33314422036e-1f));
  p = at::vec::fmadd(p, x2, V(-3.33332819422e-1f));
  return V::blendv(far, at::vec::fmadd(p * x2, x, x), x.abs() < V(0.625f));
}

template <typename S>
struct Lanes<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V load(const S* p) { return V::loadu(p); }
  static void store(S* p, V v) { v.store(p); }
  // 16-bit types are computed in float vectors: converted on load and store.
  template <typename T, typename = std::enable_if_t<at::is_reduced_floating_point_v<T> && std::is_same_v<S, float>>>
  static V load(const T* p) {
    V v;
    at::vec::load_to_float(p, v);
    return v;
  }
  template <typename T, typename = std::enable_if_t<at::is_reduced_floating_point_v<T> && std::is_same_v<S, float>>>
  static void store(T* p, V v) {
    at::vec::convert_from_float<T>(v, v).store(p, V::size());
  }
  static V exp(V x) {
    if constexpr (std::is_same_v<S, float>)
      return exp_fast(x);
    else
      return x.exp();
  }
  static V tanh(V x) {
    if constexpr (std::is_same_v<S, float>)
      return tanh_fast(x);
    else
      return x.tanh();
  }
  static V relu(V x) { return at::vec::maximum(x, V(0)); }
  static V relu_grad(V dh, V h) { return V::blendv(V(0), dh, h > V(0)); }
  static V clamp(V x, V lo, V hi) { return at::vec::clamp(x, lo, hi); }
  static V log1p(V x) { return x.log1p(); }
  static V abs(V x) { return x.abs(); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V ge(V a, V b) { return a >= b; }
  static V eq(V a, V b) { return a == b; }
  static V either(V m, V n) { return m | n; }
  static V pick(V m, V yes, V no) { return V::blendv(no, yes, m); }
  static S sum(V x) {
    return at::vec::vec_reduce_all<S>([](V a, V b) { return a + b; }, x);
  }
};

// N vectors at a time (the cells' main loop, CpuLauncher::apply_row): each operation on all N before the next,
// so that the vectors' independent chains interleave. One vector's cell is a chain of dependent operations (the
// exps' polynomials, the divisions, c then tanh(c)) longer than the out-of-order window overlaps.
template <typename S, int N>
struct Lanes<at::vec::VectorizedN<S, N>> {
  using V = at::vec::VectorizedN<S, N>;
  using L = Lanes<at::vec::Vectorized<S>>;
  static constexpr int64_t kStep = at::vec::Vectorized<S>::size();
  template <typename F, typename... A>
  static V each(const F& f, const A&... a) {
    V out;
    for (int i = 0; i < N; ++i) out[i] = f(a[i]...);
    return out;
  }
  template <typename T>
  static V load(const T* p) {
    V v;
    for (int i = 0; i < N; ++i) v[i] = L::load(p + i * kStep);
    return v;
  }
  template <typename T>
  static void store(T* p, const V& v) {
    for (int i = 0; i < N; ++i) L::store(p + i * kStep, v[i]);
  }
  // L's function of the same name on each vector
#define RNNEXT_EACH(name)                                              \
  template <typename... A>                                             \
  static V name(const A&... a) {                                       \
    return each([](const auto&... u) { return L::name(u...); }, a...); \
  }
  RNNEXT_EACH(exp)
  RNNEXT_EACH(tanh)
  RNNEXT_EACH(relu)
  RNNEXT_EACH(relu_grad)
  RNNEXT_EACH(clamp)
  RNNEXT_EACH(log1p)
  RNNEXT_EACH(abs)
  RNNEXT_EACH(min)
#undef RNNEXT_EACH
  static V ge(const V& a, const V& b) { return a >= b; }
  static V eq(const V& a, const V& b) { return a == b; }
  static V either(const V& m, const V& n) { return m | n; }
  static V pick(const V& m, const V& yes, const V& no) { return V::blendv(no, yes, m); }
};

}  // namespace cells
}  // namespace rnnext
