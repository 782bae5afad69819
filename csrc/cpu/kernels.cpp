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

template <typename S>
struct Lanes<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V load(const S* p) { return V::loadu(p); }
  static void store(S* p, V v) { v.store(p); }
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
  static V relu(V x) { return at::vec::maximum(x, V(0)); }
  static V relu_grad(V dh, V h) { return V::blendv(V(0), dh, h > V(0)); }
};

}  // namespace cells

struct CpuLauncher {
  template <typename F>
  static void run(c10::Device, int64_t B, int64_t H, const F& f) {
    using S = typename F::scalar;
    using A = typename F::acc;
    // Rows per task: enough work to pay for waking a thread (the cells cost ~10-50 ns per element).
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1));
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
