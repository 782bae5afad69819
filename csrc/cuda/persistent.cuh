// Persistent CUDA kernels: one cooperative launch per layer-direction. Each CTA keeps its slice of W_hh
// in registers for the whole sequence and runs persistent/cta.h's phases for its hidden units; a grid
// barrier separates the steps (forward: h_t is read by every CTA at t+1; backward: dhg[t] by every CTA
// before dh_{t-1}), split into an arrival right after what the others read is written and a wait just
// before it is needed. The wait is bounded: a CTA that waits longer than kTimeoutNs sets the device's
// error word, every CTA writes NaN into its outputs and leaves, and the next launch on that device (or
// rnnext.ops.check_persistent()) raises. No host sync per call, and a CUDA graph's replays report too.
// Head-wise plans whose CTAs hold whole heads (Plan::local) have no barrier: a plain launch.
//
// Opt-in (path 2, or RNNEXT_CUDA_PATH=persistent) until tools/gpu_check.sh has passed with it on a GPU at
// the commit that makes it the default (kByDefault).
#pragma once
#include <ATen/Context.h>
#include <ATen/record_function.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <mutex>

#include "driver/loops.h"
#include "persistent/plan.h"
#include "persistent/status.h"

namespace rnnext {
namespace persistent {

constexpr bool kByDefault = false;
constexpr long long kTimeoutNs = 5'000'000'000LL;  // no step waits 5 s for the others unless something is broken

__device__ __forceinline__ long long now_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// This CTA's writes of the step (every thread's: the block sync first) released to the others (alone: none).
__device__ __forceinline__ void arrive(const Grid& g, bool alone) {
  __syncthreads();
  if (!alone && threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(g.arrivals) : "memory");
}

// Until every CTA arrived s + 1 times (barrier s), acquiring their writes; false: some CTA gave up.
__device__ __forceinline__ bool wait(const Grid& g, long long s) {
  int ok = 1;
  if (threadIdx.x == 0) {
    const unsigned long long target = (unsigned long long)(s + 1) * g.ctas;
    const long long start = now_ns();
    for (;;) {
      unsigned long long v;
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(g.arrivals) : "memory");
      if (v >= target) break;
      const long long waited = now_ns() - start;
      if (waited > 1'000'000 && *reinterpret_cast<volatile int*>(g.error)) {  // host memory: not every poll
        ok = 0;
        break;
      }
      if (waited > g.timeout_ns) {
        atomicExch_system(g.error, 1);
        ok = 0;
        break;
      }
      __nanosleep(20);
    }
  }
  return __syncthreads_and(ok);
}

template <typename Cell, typename S, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(Plan pl, cells::SeqFwd<S, A> p, const S* w_hh, const S* h0, S* buf0, S* buf1, S* h_n, Grid grid) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const ForwardCTA<Cell, S, A> cta{pl, p, int32_t(blockIdx.x), smem, w_hh, h0, buf0, buf1, h_n, grid};
  ForwardRegs<Cell, S, A> r;
  cta.prologue(r, tid);
  cta.prefetch(0, tid);
  for (int32_t t = 0; t < p.T; ++t) {
    if (t > 0 && !pl.local && !wait(grid, t - 1)) return cta.poison(tid);
    cta.stage(t, tid);
    copies_done();
    __syncthreads();
    cta.template multiply<1>(&r, tid);
    __syncthreads();
    cta.cell(r, t);
    arrive(grid, pl.local);
    cta.store(t, tid);
    cta.prefetch(t + 1, tid);
  }
  if (!pl.local && !wait(grid, p.T - 1)) return cta.poison(tid);
  cta.epilogue(r);
}

template <typename Cell, typename S, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(Plan pl, cells::SeqBwd<S, A> p, const S* w_hh, S* dh, Grid grid) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const BackwardCTA<Cell, S, A> cta{pl, p, int32_t(blockIdx.x), smem, w_hh, dh, grid};
  BackwardRegs<Cell, S, A> r;
  cta.prologue(r, tid);
  cta.prefetch(p.T - 1, tid);
  for (int32_t t = p.T - 1; t >= 0; --t) {
    copies_done();
    __syncthreads();
    cta.cell(r, t);
    arrive(grid, pl.local);
    cta.prefetch(t - 1, tid);
    if (!pl.local && !wait(grid, p.T - 1 - t)) return cta.poison(tid);
    cta.stage(t, tid);
    copies_done();
    __syncthreads();
    cta.template multiply<1>(&r, tid);
    __syncthreads();
    cta.gather(r);
  }
  cta.epilogue(r);
}

inline Capacity device_capacity(int device) {
  int sms = 0, smem = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return {.sms = sms, .smem_per_block = smem, .arch = 10 * major + minor};
}

// A kernel's dynamic shared memory limit raised to the device's opt-in maximum, once per device: a limit
// set per call to that call's size would let two host threads with different shapes undo each other's.
template <auto kernel>
void allow_shared_memory(int device, int64_t bytes) {
  static std::once_flag once[64];
  TORCH_CHECK(device >= 0 && device < 64, "rnnext: device index ", device, " out of range");
  std::call_once(once[device], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  });
}

// The device's error word: mapped host memory the kernels write and the host reads without a sync (null
// where none was made and create is false).
inline int* error_word(int device, bool on_device, bool create = true) {
  static std::mutex mutex;
  static int* host[64] = {};
  static int* mapped[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "rnnext: device index ", device, " out of range");
  const std::lock_guard<std::mutex> lock(mutex);
  if (!host[device] && create) {
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host[device]), sizeof(int),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    *host[device] = 0;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped[device]), host[device], 0));
  }
  return on_device ? mapped[device] : host[device];
}

// The plan for `kernel` on this device, unfit (fits = 0) where its CTAs cannot all be resident at once (local
// plans: where one cannot).
template <auto kernel>
Plan device_plan(Dir dir, int64_t G, int64_t B, int64_t H, int64_t elem, Mma mma, int64_t parts, int64_t head,
                 int device) {
  const Capacity cap = device_capacity(device);
  Plan pl = make_plan(dir, G, B, H, elem, mma, parts, cap, head);
  if (!pl.fits) return pl;
  allow_shared_memory<kernel>(device, cap.smem_per_block);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, pl.threads, size_t(pl.smem)));
  if (per_sm < 1 || (!pl.local && int64_t(per_sm) * cap.sms < pl.ctas)) pl.fits = 0;
  return pl;
}

// Errors of a cooperative launch that mean it cannot run here (too many CTAs for the device as it is
// shared now: MPS, green contexts, another kernel's residency), not that something is broken.
inline bool cannot_launch_here(cudaError_t e) {
  return e == cudaErrorCooperativeLaunchTooLarge || e == cudaErrorNotSupported || e == cudaErrorLaunchOutOfResources;
}

// Launches kernel(pl, args..., grid) cooperatively (local plans: plainly) on the current stream; false: it could
// not run here
// (nothing ran; the caller takes the per-step path). RNNEXT_TEST_BARRIER_TIMEOUT=1 (tests only) makes
// every barrier wait for one CTA too many, 0.2 s.
template <typename Kernel, typename... Args>
bool launch(const char* name, Kernel kernel, const Plan& pl, int device, Args... args) {
  raise_if_failed(error_word(device, false));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto arrivals = at::zeros({1}, at::TensorOptions().device(at::kCUDA, device).dtype(at::kLong));
  const bool hang = std::getenv("RNNEXT_TEST_BARRIER_TIMEOUT") != nullptr;
  Grid grid{reinterpret_cast<unsigned long long*>(arrivals.mutable_data_ptr<int64_t>()), error_word(device, true),
            (unsigned long long)(pl.ctas + hang), hang ? 200'000'000LL : kTimeoutNs};
  Plan plan = pl;
  void* ptrs[] = {&plan, &args..., &grid};
  const void* fn = reinterpret_cast<void*>(kernel);
  const dim3 ctas(unsigned(pl.ctas)), threads(unsigned(pl.threads));
  const cudaError_t e = pl.local ? cudaLaunchKernel(fn, ctas, threads, ptrs, size_t(pl.smem), stream)
                                 : cudaLaunchCooperativeKernel(fn, ctas, threads, ptrs, size_t(pl.smem), stream);
  if (cannot_launch_here(e)) {
    (void)cudaGetLastError();  // not sticky: clear it so that the per-step path's launch checks pass
    TORCH_WARN_ONCE("rnnext: the persistent kernel ", name, " could not be launched here (", cudaGetErrorString(e),
                    "); running the per-step path instead");
    return false;
  }
  C10_CUDA_CHECK(e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// TF32 where torch allows it for float matmuls; 16-bit types always; double never.
template <typename S>
bool has_mma() {
  if constexpr (mma_of<S> == Mma::None) return false;
  if constexpr (std::is_same_v<S, float>) return at::globalContext().allowTF32CuBLAS();
  return true;
}

template <typename Cell, typename S, typename A>
bool forward(Path path, const cells::SeqFwd<S, A>& p, const Tensor& w_hh, int64_t head, Tensor& h) {
  if constexpr (mma_of<S> == Mma::None) {
    return false;
  } else {
    if (!use_persistent(path, kByDefault) || !has_mma<S>()) return false;
    c10::cuda::CUDAGuard device_guard(h.device());
    constexpr auto kernel = forward_kernel<Cell, S, A>;
    const Plan pl = device_plan<kernel>(Dir::Forward, Cell::G, p.B, p.H, sizeof(S), mma_of<S>, forward_parts<Cell>(),
                                        head, h.get_device());
    if (!pl.fits) return false;
    RECORD_FUNCTION("rnnext::persistent_forward", std::vector<c10::IValue>());
    auto buf0 = at::empty_like(h), buf1 = at::empty_like(h);
    return launch("persistent_forward", kernel, pl, h.get_device(), p, cptr<S>(w_hh), cptr<S>(h), mptr<S>(buf0),
                  mptr<S>(buf1), mptr<S>(h));
  }
}

template <typename Cell, typename S, typename A>
bool backward(Path path, const cells::SeqBwd<S, A>& p, const Tensor& w_hh, int64_t head, Tensor& dh) {
  if constexpr (mma_of<S> == Mma::None) {
    return false;
  } else {
    if (!use_persistent(path, kByDefault) || !has_mma<S>()) return false;
    c10::cuda::CUDAGuard device_guard(dh.device());
    constexpr auto kernel = backward_kernel<Cell, S, A>;
    const Plan pl = device_plan<kernel>(Dir::Backward, Cell::G, p.B, p.H, sizeof(S), mma_of<S>, backward_parts<Cell>(),
                                        head, dh.get_device());
    if (!pl.fits) return false;
    RECORD_FUNCTION("rnnext::persistent_backward", std::vector<c10::IValue>());
    return launch("persistent_backward", kernel, pl, dh.get_device(), p, cptr<S>(w_hh), mptr<S>(dh));
  }
}

// check_persistent's CUDA part: every device with an error word, synchronized, then read.
inline void check_devices() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return (void)cudaGetLastError();
  for (int d = 0; d < n && d < 64; ++d) {
    if (!error_word(d, false, false)) continue;
    c10::cuda::CUDAGuard guard(d);
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    raise_if_failed(error_word(d, false));
  }
}

}  // namespace persistent
}  // namespace rnnext
