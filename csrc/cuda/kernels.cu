// CUDA pointwise kernels: the cells/step.h functors, one thread per element, current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "driver/cell_ops.h"

namespace rnnext {

template <typename F>
__global__ void elementwise_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) f(i);
}

struct CudaLauncher {
  template <typename F>
  static void run(c10::Device device, int64_t n, const F& f) {
    if (n == 0) return;
    c10::cuda::CUDAGuard guard(device);
    constexpr int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20);
    elementwise_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

TORCH_LIBRARY_IMPL(rnnext, CUDA, m) { register_cell_ops<CudaLauncher>(m); }

}  // namespace rnnext
