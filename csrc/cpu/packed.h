// 16-bit GEMMs on AMX: oneDNN's brgemm micro-kernel (ATen's cpublas) with B packed by cpublas::pack into the
// layout AMX reads (VNNI: pairs of rows interleaved), once per sequence for the weights, accumulated in float and
// rounded once. Chosen at run time: cpublas refuses to pack without AMX (the AMD EPYC of docs/design.md), and
// RNNEXT_CPU_PACKED=0 forces the fallback; there CpuLauncher::gemm runs what it ran before (cpu/launcher.h).
#pragma once
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "driver/common.h"

namespace rnnext {
namespace packed {

// A packed B [K, N] is [panels, even(K), kWidth] of its dtype: panels of kWidth columns (the widest block pack
// writes: it takes 16, 32, 48 or 64), K in blocks of kDepth rows, the tails zero. Each (panel, block) is packed
// on its own, so that the GEMM finds a block at its row without relying on the layout inside. pack wants an
// even K (a VNNI row is a pair), so an odd block has a zero row more, and its A a zero column more.
constexpr int64_t kWidth = 64, kDepth = 512, kTileM = 128;
inline int64_t even(int64_t k) { return k + (k & 1); }
inline int64_t panels(int64_t N) { return (N + kWidth - 1) / kWidth; }

// The switch: RNNEXT_CPU_PACKED=0 when the library loads forces the fallback; the test-only op set_cpu_packed
// flips it.
inline std::atomic<bool>& allowed() {
  static std::atomic<bool> on(![] {
    const char* v = std::getenv("RNNEXT_CPU_PACKED");
    return v != nullptr && std::string(v) == "0";
  }());
  return on;
}

// The micro-kernels on a [K, kWidth] block (K even): oneDNN's through cpublas (AMX), or Emulated's.
struct Cpublas {
  static void pack(int64_t K, at::ScalarType type, const uint16_t* in, uint16_t* out) {
    at::native::cpublas::pack(K, kWidth, kWidth, kWidth, type, type, in, out);
  }
  // C[M, kWidth] (row stride ldc) += A[M, K] (row stride lda) @ the packed block
  template <typename S>
  static void brgemm(int64_t M, int64_t K, int64_t lda, int64_t ldc, const S* A, const S* B, float* C) {
    at::native::cpublas::brgemm(M, kWidth, K, lda, kWidth, ldc, true, A, B, C, true);
  }
  static void release() { at::native::cpublas::brgemm_release(true); }  // the AMX state this thread configured
};

// The same contract in plain C++, in the VNNI layout oneDNN documents (element (k, n) at (k / 2) * 2 * kWidth +
// 2 * n + k % 2): the tiling and padding around the kernels run on any CPU (the test op cpu_gemm).
struct Emulated {
  static void pack(int64_t K, at::ScalarType, const uint16_t* in, uint16_t* out) {
    TORCH_CHECK(K % 2 == 0, "pack: odd K");
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < kWidth; ++n) out[k / 2 * 2 * kWidth + 2 * n + k % 2] = in[k * kWidth + n];
  }
  template <typename S>
  static void brgemm(int64_t M, int64_t K, int64_t lda, int64_t ldc, const S* A, const S* B, float* C) {
    TORCH_CHECK(K % 2 == 0, "brgemm: odd K");
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < kWidth; ++n) {
        float c = C[m * ldc + n];
        for (int64_t k = 0; k < K; ++k) c += float(A[m * lda + k]) * float(B[k / 2 * 2 * kWidth + 2 * n + k % 2]);
        C[m * ldc + n] = c;
      }
  }
  static void release() {}
};

template <typename Kernel = Cpublas>
Tensor pack(const Tensor& b) {
  RECORD_FUNCTION("rnnext::pack", std::vector<c10::IValue>());
  const auto bc = b.contiguous();
  const int64_t K = bc.size(0), N = bc.size(1), Ke = even(K), np = panels(N), blocks = (K + kDepth - 1) / kDepth;
  auto out = at::empty({np, Ke, kWidth}, bc.options());
  const auto type = bc.scalar_type();
  // bfloat16 and half alike: 16-bit words, zero is all zero bits
  const auto* src = static_cast<const uint16_t*>(bc.const_data_ptr());
  auto* dst = static_cast<uint16_t*>(out.mutable_data_ptr());
  at::parallel_for(0, np * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> tile(kDepth * kWidth);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / blocks, k0 = t % blocks * kDepth, kb = std::min(kDepth, K - k0);
      const int64_t w = std::min(kWidth, N - j * kWidth);
      std::fill(tile.begin(), tile.end(), uint16_t(0));
      for (int64_t k = 0; k < kb; ++k) std::memcpy(&tile[k * kWidth], src + (k0 + k) * N + j * kWidth, w * 2);
      Kernel::pack(even(kb), type, tile.data(), dst + (j * Ke + k0) * kWidth);
    }
  });
  return out;
}

// out = add + a @ b with b = pack(b [K, N]) (add undefined: 0; may be out itself); out's rows contiguous. Tiles of
// kTileM rows and up to 4 panels over the threads (as brgemm_gemm's), each accumulated in a float buffer that
// starts as add, over K's blocks, then rounded into out.
template <typename S, typename Kernel>
void multiply(Tensor& out, const Tensor& a_, const Tensor& b, const Tensor& add_) {
  RECORD_FUNCTION("rnnext::packed_gemm", std::vector<c10::IValue>());
  if (out.numel() == 0) return;
  const auto a = a_.stride(1) == 1 ? a_ : a_.contiguous();
  const auto add = !add_.defined() || add_.stride(1) == 1 ? add_ : add_.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1), Ke = b.size(1), np = b.size(0);
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && Ke == even(K) && np == panels(N) && b.size(2) == kWidth,
                        "packed::multiply: b is not pack's [K, N]");
  const int64_t lda = a.stride(0), ldc = out.stride(0), ldd = add.defined() ? add.stride(0) : 0;
  // Panels per tile: 4, fewer where too few row tiles keep every thread busy (the step GEMMs: M = batch)
  const int64_t row_tiles = (M + kTileM - 1) / kTileM, threads = at::get_num_threads();
  const int64_t split = row_tiles >= threads ? 1 : (threads + row_tiles - 1) / row_tiles;
  const int64_t per = std::clamp<int64_t>((np + split - 1) / split, 1, 4), tiles_n = (np + per - 1) / per;
  const S *A = a.const_data_ptr<S>(), *Bp = b.const_data_ptr<S>(),
          *D = add.defined() ? add.const_data_ptr<S>() : nullptr;
  S* C = out.mutable_data_ptr<S>();
  at::parallel_for(0, row_tiles * tiles_n, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> acc;
    thread_local std::vector<S> odd;  // an odd block of A's rows with the zero column
    acc.resize(kTileM * per * kWidth);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t / tiles_n * kTileM, p0 = t % tiles_n * per, n0 = p0 * kWidth;
      const int64_t mb = std::min(kTileM, M - m0), ld = std::min(per, np - p0) * kWidth, nb = std::min(ld, N - n0);
      float* c = acc.data();
      for (int64_t r = 0; r < mb; ++r) {
        if (D)
          at::vec::convert(D + (m0 + r) * ldd + n0, c + r * ld, nb);
        else
          std::fill(c + r * ld, c + r * ld + nb, 0.f);
        std::fill(c + r * ld + nb, c + (r + 1) * ld, 0.f);
      }
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t kb = std::min(kDepth, K - k0);
        const S* ak = A + m0 * lda + k0;
        int64_t ldk = lda;
        if (kb % 2) {  // what lies past a row's end is not ours to read, and 0 * NaN is NaN
          odd.resize(mb * (kb + 1));
          for (int64_t r = 0; r < mb; ++r) {
            std::copy(ak + r * lda, ak + r * lda + kb, odd.data() + r * (kb + 1));
            odd[r * (kb + 1) + kb] = S(0);
          }
          ak = odd.data();
          ldk = kb + 1;
        }
        for (int64_t p = 0; p < ld / kWidth; ++p)
          Kernel::brgemm(mb, even(kb), ldk, ld, ak, Bp + ((p0 + p) * Ke + k0) * kWidth, c + p * kWidth);
      }
      for (int64_t r = 0; r < mb; ++r) at::vec::convert(c + r * ld, C + (m0 + r) * ldc + n0, nb);
    }
    Kernel::release();
  });
}

template <typename Kernel = Cpublas>
void gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "packed_gemm",
                                     [&] { multiply<scalar_t, Kernel>(out, a, b, add); });
}

// Whether this torch and CPU pack S, and a tiny packed GEMM gives the right answer: two blocks of K, the second
// odd, two panels, the second ragged, an add; small integers, exact in 16 bits and in float. Probed once.
template <typename S>
bool works() {
  static const bool ok = [] {
    constexpr auto type = c10::CppTypeToScalarType<S>::value;
    try {
      if (!at::native::cpublas::could_pack(type)) return false;
      const int64_t M = 3, K = kDepth + 3, N = kWidth + 6;
      auto ints = [](int64_t r, int64_t c, int64_t seed) {
        return at::arange(r * c, at::kFloat).mul(seed).remainder(7).sub(3).view({r, c});
      };
      const auto a = ints(M, K, 5), b = ints(K, N, 3), add = ints(M, N, 2);
      auto out = at::empty({M, N}, a.options().dtype(type));
      multiply<S, Cpublas>(out, a.to(type), pack(b.to(type)), add.to(type));
      return at::equal(out, at::addmm(add, a, b).to(type));
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// Whether CpuLauncher::gemm runs type's GEMMs packed: 16-bit, allowed, oneDNN on (cpublas checks it per call) and
// works().
inline bool use(at::ScalarType type) {
  if (!at::isReducedFloatingType(type) || !allowed().load() || !at::globalContext().userEnabledMkldnn()) return false;
  return type == at::kBFloat16 ? works<at::BFloat16>() : works<at::Half>();
}

// Whether a GEMM whose B is not a weight (the weight gradients': a chunk's gate gradients) is packed for the one
// call: where A has a tile of rows at least, so each packed element is used kTileM times (a guess: no AMX machine
// measured it, docs/design.md).
inline bool per_call(const Tensor& out, const Tensor& a) {
  return a.size(0) >= kTileM && out.stride(1) == 1 && use(out.scalar_type());
}

}  // namespace packed
}  // namespace rnnext
