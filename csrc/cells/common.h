// Cell math shared by the CPU and CUDA kernels: every function here is compiled by both compilers,
// so the CPU tests exercise the exact code the GPU runs. The math is templated on V, the type of a
// value being computed: the accumulation type (one element; CPU and CUDA) or an at::vec::Vectorized
// (a row segment; CPU, see cpu/vec.h, which specialises Lanes for it).
#pragma once
#include <math.h>
#include <stdint.h>

// Always inlined: the kernels are loops over these functions, and a call per element (or per vector)
// costs more than the math (measured: GCC left LSTMFwd's per-gate helper out of line, 20% of a step).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define RNNEXT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RNNEXT_HD inline __attribute__((always_inline))
#else
#define RNNEXT_HD inline
#endif

namespace rnnext {
namespace cells {

// Overloads rather than templates: float must stay float on the device (expf, not exp).
RNNEXT_HD float exp_(float x) { return expf(x); }
RNNEXT_HD double exp_(double x) { return exp(x); }
RNNEXT_HD float tanh_(float x) { return tanhf(x); }
RNNEXT_HD double tanh_(double x) { return tanh(x); }
RNNEXT_HD float log1p_(float x) { return log1pf(x); }
RNNEXT_HD double log1p_(double x) { return log1p(x); }

// What differs between one value and a vector of them: memory access, transcendentals, selects.
template <typename V>
struct Lanes {
  template <typename S>
  static RNNEXT_HD V load(const S* p) {
    return V(*p);
  }
  template <typename S>
  static RNNEXT_HD void store(S* p, V v) {
    *p = S(v);
  }
  static RNNEXT_HD V exp(V x) { return exp_(x); }
  static RNNEXT_HD V tanh(V x) { return tanh_(x); }
  static RNNEXT_HD V relu(V x) { return x < V(0) ? V(0) : x; }  // keeps NaN, as torch.relu does
  static RNNEXT_HD V relu_grad(V dh, V h) { return h > V(0) ? dh : V(0); }
  static RNNEXT_HD V clamp(V x, V lo, V hi) { return x < lo ? lo : (x > hi ? hi : x); }
  static RNNEXT_HD V sum(V x) { return x; }  // over the lanes
  static RNNEXT_HD V log1p(V x) { return log1p_(x); }
  static RNNEXT_HD V abs(V x) { return x < V(0) ? V(0) - x : x; }
  static RNNEXT_HD V min(V a, V b) { return b < a ? b : a; }
  // Comparisons give a mask (bool here, a lane mask for vectors) that pick selects with.
  static RNNEXT_HD bool ge(V a, V b) { return a >= b; }
  static RNNEXT_HD bool eq(V a, V b) { return a == b; }
  static RNNEXT_HD bool either(bool m, bool n) { return m || n; }
  static RNNEXT_HD V pick(bool m, V yes, V no) { return m ? yes : no; }
};

template <typename V>
RNNEXT_HD V sigmoid(V x) {
  return V(1) / (V(1) + Lanes<V>::exp(V(0) - x));
}

// Derivatives expressed through the activation's output, which is what backward has saved.
template <typename V>
RNNEXT_HD V dsigmoid(V y) {
  return y * (V(1) - y);
}
template <typename V>
RNNEXT_HD V logsigmoid(V x) {  // min(x, 0) - log(1 + e^-|x|): no overflow, no log(0)
  using L = Lanes<V>;
  return L::min(x, V(0)) - L::log1p(L::exp(V(0) - L::abs(x)));
}

template <typename V>
RNNEXT_HD V dtanh(V y) {
  return V(1) - y * y;
}

}  // namespace cells
}  // namespace rnnext
