// Cell math shared by the CPU and CUDA kernels: every function here is compiled by both compilers,
// so the CPU tests exercise the exact code the GPU runs.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RNNEXT_HD __host__ __device__ __forceinline__
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

template <typename T>
RNNEXT_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Derivatives expressed through the activation's output, which is what backward has saved.
template <typename T>
RNNEXT_HD T dsigmoid(T y) {
  return y * (T(1) - y);
}
template <typename T>
RNNEXT_HD T dtanh(T y) {
  return T(1) - y * y;
}

}  // namespace cells
}  // namespace rnnext
