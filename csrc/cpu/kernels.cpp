// CPU pointwise kernels: the cells/step.h functors over at::parallel_for.
#include <ATen/Parallel.h>

#include "driver/cell_ops.h"

namespace rnnext {

struct CpuLauncher {
  template <typename F>
  static void run(c10::Device, int64_t n, const F& f) {
    at::parallel_for(0, n, /*grain_size=*/4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }
};

TORCH_LIBRARY_IMPL(rnnext, CPU, m) { register_cell_ops<CpuLauncher>(m); }

}  // namespace rnnext
