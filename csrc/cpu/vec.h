// The CPU's vector math: Lanes for at::vec::Vectorized (cells/common.h's contract), loads and stores of 16-bit
// types as float vectors, the float exp and tanh. Vectorized is real SIMD only when this file is built with a
// CPU_CAPABILITY (setup.py picks AVX512 or AVX2 from the build machine).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "cells/common.h"

namespace rnnext {
namespace cells {

// float exp for the cells: Cephes expf instead of Sleef's (Vectorized::exp), which costs more than the cell's
// other math (docs/design.md, "Cells written once").
// n = round(x log2 e), r = x - n ln 2 in two parts (Cody-Waite), a polynomial for e^r, times 2^n by
// scalef (inf and 0 past the ends; min/max return their second operand when one is NaN, so NaN stays).
inline at::vec::Vectorized<float> exp_fast(at::vec::Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
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

}  // namespace cells
}  // namespace rnnext
