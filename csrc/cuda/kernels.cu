// CUDA pointwise kernels: the cells/step.h functors, one thread per element, current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "cuda/persistent.cuh"
#include "driver/register.h"

namespace rnnext {

template <typename F>
__global__ void elementwise_kernel(int64_t n, int64_t H, F f) {
  using A = typename F::acc;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x)
    f.template apply<A>(i / H, i % H);
}

// One block per row (cells/layernorm.h's executor): loops strided over the threads, sums over the block.
struct BlockRow {
  template <typename A, typename Fn>
  RNNEXT_HD void loop(int64_t n, const Fn& fn) const {
#if defined(__CUDA_ARCH__)
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) fn.template operator()<A>(k);
#endif
  }
  template <typename A, int M, typename Fn>
  RNNEXT_HD cells::Sums<A, M> sums(int64_t n, const Fn& fn) const {
    cells::Sums<A, M> s;
    for (int m = 0; m < M; ++m) s.v[m] = A(0);
    loop<A>(n, [&]<typename V>(int64_t k) { fn.template operator()<V>(k, s.v); });
    for (int m = 0; m < M; ++m) s.v[m] = sum(s.v[m]);
    return s;
  }
  // v summed over the block, to every thread
  template <typename A>
  RNNEXT_HD A sum(A v) const {
#if defined(__CUDA_ARCH__)
    __shared__ double partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the previous sum's readers are done with partial
    if (lane == 0) partial[warp] = double(v);
    __syncthreads();
    if (warp == 0) {
      v = lane < int(blockDim.x + 31) / 32 ? A(partial[lane]) : A(0);
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) partial[0] = double(v);
    }
    __syncthreads();
    return A(partial[0]);
#else
    return v;
#endif
  }
};

template <typename F>
__global__ void rows_kernel(F f) {
  f.row(blockIdx.x, BlockRow{});
}

struct CudaLauncher {
  template <typename F>
  static void run_rows(c10::Device device, int64_t B, const F& f) {
    if (B == 0) return;
    c10::cuda::CUDAGuard guard(device);
    rows_kernel<<<unsigned(B), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Every step's projection in one GEMM (and the persistent kernel needs them all).
  static int64_t chunk_steps(int64_t, int64_t, int64_t) { return std::numeric_limits<int64_t>::max(); }
  static bool wants_persistent(Path path) { return use_persistent(path, persistent::kByDefault); }

  static void gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add) { aten_gemm(out, a, b, add); }

  static Tensor contiguous(const Tensor& m) { return m.contiguous(); }
  static Tensor right_operand(const Tensor& m) { return m.contiguous(); }
  static Tensor step_weights(const Tensor& w_t, int64_t, int64_t, int64_t) { return w_t.contiguous(); }
  static int64_t gate_stride(int64_t GH, at::ScalarType) { return GH; }

  template <bool Rows, typename S, typename MakeF>
  static void gemm_cell_steps(int64_t t0, int64_t t1, Tensor& hg, const Tensor& h, const Tensor& other,
                              const Tensor& w_t, int64_t H, int64_t head, const MakeF& make_f) {
    gemm_cell_each_step<CudaLauncher, Rows>(t0, t1, hg, h, other, w_t, H, head, make_f);
  }
  template <bool Rows, typename S, typename MakeF>
  static void cell_gemm_steps(int64_t t0, int64_t t1, Tensor& dh, const Tensor& dhg, const Tensor& direct,
                              const Tensor& w_hh, int64_t H, int64_t head, bool to_h0, const MakeF& make_f) {
    cell_gemm_each_step<CudaLauncher, Rows>(t0, t1, dh, dhg, direct, w_hh, H, head, to_h0, make_f);
  }

  template <typename Cell, typename S, typename A>
  static bool persistent_forward(Path path, const cells::SeqFwd<S, A>& p, const Tensor& w_hh, int64_t head, Tensor& h) {
    return persistent::forward<Cell>(path, p, w_hh, head, h);
  }
  template <typename Cell, typename S, typename A>
  static bool persistent_backward(Path path, const cells::SeqBwd<S, A>& p, const Tensor& w_hh, int64_t head,
                                  Tensor& dh) {
    return persistent::backward<Cell>(path, p, w_hh, head, dh);
  }

  template <typename F>
  static void run(c10::Device device, int64_t B, int64_t H, const F& f) {
    const int64_t n = B * H;
    if (n == 0) return;
    c10::cuda::CUDAGuard guard(device);
    constexpr int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20);
    elementwise_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, H, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

TORCH_LIBRARY_IMPL(rnnext, CUDA, m) { register_ops<CudaLauncher>(m); }

static const bool persistent_status_added = persistent::add_status_check(&persistent::check_devices);

}  // namespace rnnext
