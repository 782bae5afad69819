// CPU pointwise kernels: the cells/step.h functors over rows in parallel, each row's columns in
// at::vec vectors (float, double) then scalars. Vectorized is real SIMD only when this file is built
// with a CPU_CAPABILITY (setup.py picks AVX512 or AVX2 from the build machine).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "driver/register.h"

namespace rnnext {
namespace cells {

// float tanh through exp: Sleef's tanh (Vectorized::tanh) costs ~5 exps, and the cells need 1-2 tanh
// per element. 1 - 2/(e^2x + 1), with an odd polynomial near 0 where that form cancels (Cephes
// tanhf coefficients); measured max relative error 2.5e-7 on [-4, 4].
inline at::vec::Vectorized<float> tanh_fast(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  const V one(1.f), two(2.f), x2 = x * x;
  V far = one - two / ((x * two).exp() + one);
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
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) {
    if constexpr (std::is_same_v<S, float>)
      return tanh_fast(x);
    else
      return x.tanh();
  }
  static V relu(V x) { return at::vec::maximum(x, V(0)); }
  static V relu_grad(V dh, V h) { return V::blendv(V(0), dh, h > V(0)); }
  static V clamp(V x, V lo, V hi) { return at::vec::clamp(x, lo, hi); }
};

}  // namespace cells

struct CpuLauncher {
  template <typename F>
  static void run(c10::Device, int64_t B, int64_t H, const F& f) {
    using S = typename F::scalar;
    using A = typename F::acc;
    // Rows per task: enough work to pay for waking a thread (the cells cost ~1-4 ns per element).
    const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(H, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t j = 0;
        if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
          using V = at::vec::Vectorized<S>;
          for (; j + V::size() <= H; j += V::size()) f.template apply<V>(b, j);
        }
        for (; j < H; ++j) f.template apply<A>(b, j);
      }
    });
  }
};

TORCH_LIBRARY_IMPL(rnnext, CPU, m) { register_ops<CpuLauncher>(m); }

}  // namespace rnnext
