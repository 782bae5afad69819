// Persistent CUDA kernels: one cooperative launch per layer-direction. Each CTA keeps its slice of
// W_hh in shared memory for the whole sequence and runs persistent/cta.h's step for its hidden units;
// a grid barrier separates the steps (forward: h_t is read by every CTA at t+1; backward: dgates_t by
// every CTA before dh_{t-1}). The barrier's wait is bounded: a CTA that waits longer than kTimeoutNs
// sets an error flag, every CTA leaves, and the host raises a RuntimeError naming the kernel.
//
// Opt-in (path 2, or RNNEXT_PATH=persistent) until tools/gpu_check.sh has passed with it on a GPU at
// the commit that makes it the default (kByDefault).
#pragma once
#include <ATen/record_function.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>

#include "driver/loops.h"
#include "persistent/plan.h"

namespace rnnext {
namespace persistent {

constexpr bool kByDefault = false;
constexpr int kThreads = 256;
constexpr long long kTimeoutNs = 5'000'000'000LL;  // no step waits 5 s for the others unless something is broken

__device__ __forceinline__ long long now_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// flags[0]: arrivals (monotonic: barrier s waits for (s + 1) * ctas); flags[1]: error. Zeroed per launch.
struct GridSync {
  unsigned* arrivals;
  int* error;
  unsigned ctas;      // arrivals per barrier
  long long timeout;  // ns

  __device__ void block() const { __syncthreads(); }

  // false: some CTA gave up waiting; every thread of the block returns (thread 0 decides for all).
  __device__ bool grid(unsigned s) const {
    int ok = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();  // this CTA's writes of the step, before its arrival is seen
      atomicAdd(arrivals, 1u);
      const unsigned target = (s + 1) * ctas;
      const long long start = now_ns();
      while (*reinterpret_cast<volatile unsigned*>(arrivals) < target) {
        if (*reinterpret_cast<volatile int*>(error)) break;
        if (now_ns() - start > timeout) {
          atomicExch(error, 1);
          break;
        }
        __nanosleep(32);
      }
      __threadfence();  // the others' writes, before this CTA reads them
      ok = *reinterpret_cast<volatile int*>(error) == 0;
    }
    return __syncthreads_or(ok);  // thread 0's verdict, to every thread (no shared memory: see the plan)
  }
};

template <typename Cell, typename S, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(Plan pl, cells::SeqFwd<S, A> p, const S* w_hh, S* h, S* other, S* hg, GridSync sync) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t k = blockIdx.x, tid = threadIdx.x, n = blockDim.x;
  load_weights(pl, k, w_hh, reinterpret_cast<S*>(smem), tid, n);
  __syncthreads();
  for (int64_t t = 0; t < p.T; ++t) {  // even steps read h and write other, odd steps the reverse
    forward_step<Cell>(pl, p, k, t, t % 2 ? other : h, t % 2 ? h : other, hg, smem, tid, n, sync);
    if (!sync.grid(unsigned(t))) return;
  }
  if (p.T % 2) {  // the final state is in other: this CTA's units to h
    const int64_t j0 = first_unit(pl, k), nu = units_of(pl, k);
    for (int64_t i = tid; i < p.B * nu; i += n) h[i / nu * p.H + j0 + i % nu] = other[i / nu * p.H + j0 + i % nu];
  }
}

template <typename Cell, typename S, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(Plan pl, cells::SeqBwd<S, A> p, const S* w_hh, S* dh, GridSync sync) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t k = blockIdx.x, tid = threadIdx.x, n = blockDim.x;
  load_weights(pl, k, w_hh, reinterpret_cast<S*>(smem), tid, n);
  __syncthreads();
  for (int64_t t = p.T - 1; t >= 0; --t) {
    backward_cell<Cell>(pl, p, k, t, dh, tid, n);
    if (!sync.grid(unsigned(p.T - 1 - t))) return;
    backward_gemm(pl, p, k, t, dh, smem, tid, n, sync);
  }
}

inline Capacity device_capacity(int device) {
  int sms = 0, smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // The kernels have no static shared memory: the dynamic block starts at 0, aligned for wmma.
  return {.sms = sms, .smem_per_block = smem, .threads = kThreads, .min_rows = 32, .align_units = true};
}

// The plan for `kernel` on this device, unfit (fits = 0) where its CTAs cannot all be resident at once.
template <typename Kernel>
Plan device_plan(Kernel kernel, Dir dir, int64_t G, int64_t B, int64_t H, int64_t elem, int64_t acc, bool mma,
                 int device) {
  const Capacity cap = device_capacity(device);
  Plan pl = make_plan(dir, G, B, H, elem, acc, mma, cap);
  if (!pl.fits) return pl;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(pl.smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, pl.threads, size_t(pl.smem)));
  if (int64_t(per_sm) * cap.sms < pl.ctas) pl.fits = 0;
  return pl;
}

// Launches kernel(pl, args...) cooperatively on the current stream, then turns a barrier timeout into
// an error naming it. The check reads the flag back (a sync), except while a CUDA graph is captured.
// RNNEXT_TEST_BARRIER_TIMEOUT=1 (tests only) makes every barrier wait for one CTA too many, 0.2 s.
template <typename Kernel, typename... Args>
void launch(const char* name, Kernel kernel, const Plan& pl, const Tensor& flags, Args... args) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool hang = std::getenv("RNNEXT_TEST_BARRIER_TIMEOUT") != nullptr;
  GridSync sync{reinterpret_cast<unsigned*>(flags.mutable_data_ptr<int>()), flags.mutable_data_ptr<int>() + 1,
                unsigned(pl.ctas + hang), hang ? 200'000'000LL : kTimeoutNs};
  Plan plan = pl;
  void* ptrs[] = {&plan, &args..., &sync};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(unsigned(pl.ctas)),
                                             dim3(unsigned(pl.threads)), ptrs, size_t(pl.smem), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cudaStreamCaptureStatus capturing;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  if (capturing == cudaStreamCaptureStatusNone)
    TORCH_CHECK(flags[1].item<int>() == 0, "rnnext: the persistent kernel ", name,
                " timed out in its grid barrier (a CTA waited more than 5 s for the others); its results are "
                "invalid. Please report it; rnnext.use_backend('step') avoids that kernel.");
}

template <typename Cell, typename S, typename A>
bool forward(Path path, const cells::SeqFwd<S, A>& p, const Tensor& w_hh, Tensor& h) {
  if (path != Path::Persistent && !kByDefault) return false;
  c10::cuda::CUDAGuard device_guard(h.device());
  auto kernel = forward_kernel<Cell, S, A>;
  const Plan pl = device_plan(kernel, Dir::Forward, Cell::G, p.B, p.H, sizeof(S), sizeof(A), uses_mma<S>,
                              h.get_device());
  if (!pl.fits) return false;
  RECORD_FUNCTION("rnnext::persistent_forward", std::vector<c10::IValue>());
  auto flags = at::zeros({2}, h.options().dtype(at::kInt));
  auto other = at::empty_like(h), hg = at::empty({p.B, Cell::G * p.H}, h.options());
  launch("persistent_forward", kernel, pl, flags, p, cptr<S>(w_hh), mptr<S>(h), mptr<S>(other), mptr<S>(hg));
  return true;
}

template <typename Cell, typename S, typename A>
bool backward(Path path, const cells::SeqBwd<S, A>& p, const Tensor& w_hh, Tensor& dh) {
  if (path != Path::Persistent && !kByDefault) return false;
  c10::cuda::CUDAGuard device_guard(dh.device());
  auto kernel = backward_kernel<Cell, S, A>;
  const Plan pl = device_plan(kernel, Dir::Backward, Cell::G, p.B, p.H, sizeof(S), sizeof(A), uses_mma<S>,
                              dh.get_device());
  if (!pl.fits) return false;
  RECORD_FUNCTION("rnnext::persistent_backward", std::vector<c10::IValue>());
  auto flags = at::zeros({2}, dh.options().dtype(at::kInt));
  launch("persistent_backward", kernel, pl, flags, p, cptr<S>(w_hh), mptr<S>(dh));
  return true;
}

}  // namespace persistent
}  // namespace rnnext
