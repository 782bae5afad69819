// CPU pointwise kernels: the cells/step.h functors over rows in parallel, each row's columns in
// at::vec vectors (float, double) then scalars. Vectorized is real SIMD only when this file is built
// with a CPU_CAPABILITY (setup.py picks AVX512 or AVX2 from the build machine).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string_view>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>

#include "cpu/emulation.h"
#include "driver/register.h"

namespace rnnext {
namespace cells {

// float exp for the cells: Cephes expf instead of Sleef's (Vectorized::exp): the LSTM cell op at B=32,
// H=256 17.4 -> 11.3 us.
// n = round(x log2 e), r = x - n ln 2 in two parts (Cody-Waite), a polynomial for e^r, times 2^n by
// scalef (inf and 0 past the ends; min/max return their second operand when one is NaN, so NaN stays).
inline at::vec::Vectorized<float> exp_fast(at::vec::Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
#else
  return x.exp();
#endif
}

// float tanh through exp: Sleef's tanh (Vectorized::tanh) costs ~5 exps, and the cells need 1-2 tanh
// per element. 1 - 2/(e^2x + 1), with an odd polynomial near 0 where that form cancels (Cephes
// tanhf coefficients); measured max relative error 2.5e-7 on [-4, 4].
inline at::vec::Vectorized<float> tanh_fast(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  const V one(1.f), two(2.f), x2 = x * x;
  V far = one - two / (exp_fast(x * two) + one);
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
  // 16-bit types are computed in float vectors: converted on load and store.
  template <typename T, typename = std::enable_if_t<at::is_reduced_floating_point_v<T> && std::is_same_v<S, float>>>
  static V load(const T* p) {
    V v;
    at::vec::load_to_float(p, v);
    return v;
  }
  template <typename T, typename = std::enable_if_t<at::is_reduced_floating_point_v<T> && std::is_same_v<S, float>>>
  static void store(T* p, V v) {
    at::vec::convert_from_float<T>(v, v).store(p, V::size());
  }
  static V exp(V x) {
    if constexpr (std::is_same_v<S, float>)
      return exp_fast(x);
    else
      return x.exp();
  }
  static V tanh(V x) {
    if constexpr (std::is_same_v<S, float>)
      return tanh_fast(x);
    else
      return x.tanh();
  }
  static V relu(V x) { return at::vec::maximum(x, V(0)); }
  static V relu_grad(V dh, V h) { return V::blendv(V(0), dh, h > V(0)); }
  static V clamp(V x, V lo, V hi) { return at::vec::clamp(x, lo, hi); }
  static S sum(V x) { return at::vec::vec_reduce_all<S>([](V a, V b) { return a + b; }, x); }
};

}  // namespace cells


// float GEMMs through oneDNN's brgemm micro-kernel (ATen's cpublas), tiled and threaded here. Measured
// on an AMD EPYC (AVX-512, 2 threads), where MKL (at::mm) is slow: the step GEMM [32,256]x[256,1024]
// 87 us single-threaded vs 182 us for at::mm; [3200,256]x[256,1024] 2 threads: see the closing note of
// the CPU LSTM issue. float only (16-bit needs a packed B; double has no brgemm). Whether this torch and
// CPU have it is probed once.
inline bool have_brgemm() {
  static const bool ok = [] {
    try {
      float a[1] = {1.f}, b[1] = {2.f}, c[1] = {0.f};
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, a, b, c, false);
      return c[0] == 2.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// m.contiguous(); for a transposed float matrix (stride(0) == 1) 16x16 register transposes in 64x64 blocks
// over the threads: ATen's transposing copy ran at 4-6 GB/s here (60 us for 256x256, the weight
// gradients' operands of every chunk of steps). pad (a GEMM's right operand): rows of a multiple of 4 KB
// get 64 bytes more, because brgemm reads a column block down B's rows and rows 4 KB apart share L1 sets
// (one thread, GFLOP/s: [3200,256]x[256,1024] 181 -> 198, [3200,512]x[512,2048] 190 -> 217).
inline int64_t padded_row(int64_t n) { return n % 1024 == 0 ? n + 16 : n; }

inline Tensor contiguous(const Tensor& m, bool pad = false) {
  if (m.scalar_type() != at::kFloat || m.dim() != 2 || m.stride(1) == 1 || m.stride(0) != 1) return m.contiguous();
  const int64_t M = m.size(0), N = m.size(1), ldo = pad ? padded_row(N) : N;
  auto out = at::empty({M, ldo}, m.options()).narrow(1, 0, N);
  float* dst = out.mutable_data_ptr<float>();
  constexpr int64_t kBlock = 64;
  const int64_t ld = m.stride(1), blocks_n = (N + kBlock - 1) / kBlock;
  const float* src = m.const_data_ptr<float>();  // m[i][j] at src[j * ld + i]
  at::parallel_for(0, (M + kBlock - 1) / kBlock * blocks_n, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk / blocks_n * kBlock, j0 = blk % blocks_n * kBlock;
      at::vec::transpose_mxn<float>(src + j0 * ld + i0, ld, dst + i0 * ldo + j0, ldo, int(std::min(kBlock, N - j0)),
                                    int(std::min(kBlock, M - i0)));
    }
  });
  return out;
}

// C (+)= A[M, K] @ B[K, N], row-major, K in blocks whose B is at most 512 KB (half an L2 here): a brgemm
// call over a larger B re-streams it from L3 for each block of rows. One thread, GFLOP/s, whole K vs
// blocks: [64,2048]x[2048,256] 160 vs 250, [128,4096]x[4096,512] 137 vs 252, [128,4096]x[4096,256] 69 vs
// 200, [128,1024]x[1024,256] 222 vs 254; B of 512 KB or less whole: within 2% of any blocking.
inline void brgemm_blocks(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                          const float* A, const float* B, float* C) {
  constexpr int64_t kFloats = int64_t(1) << 17;
  const int64_t block = K * N <= kFloats ? K : std::max<int64_t>(64, kFloats / N & ~int64_t(63));
  for (int64_t k0 = 0; k0 < K; k0 += block)
    at::native::cpublas::brgemm(M, N, std::min(block, K - k0), lda, ldb, ldc, add || k0 > 0, A + k0, B + k0 * ldb, C,
                                false);
}

// out = add + a @ b (add may be out itself): tiles of kTileM x kTileN over the threads, K in blocks
// accumulated in place. brgemm wants row-major operands: a transposed view is copied first.
inline void brgemm_gemm(Tensor& out, const Tensor& a_, const Tensor& b_, const Tensor& add) {
  constexpr int64_t kTileM = 128;  // tuned here: 64-128 x 128-256 within 5%
  const auto a = a_.stride(1) == 1 ? a_ : contiguous(a_), b = b_.stride(1) == 1 ? b_ : contiguous(b_);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1), lda = a.stride(0), ldb = b.stride(0),
                ldc = out.stride(0);
  // Columns per tile: 256, fewer (down to 64) where too few row tiles keep every thread busy (the step
  // GEMMs have M = batch).
  const int64_t row_tiles = (M + kTileM - 1) / kTileM, threads = at::get_num_threads();
  const int64_t split = row_tiles >= threads ? 1 : (threads + row_tiles - 1) / row_tiles;
  const int64_t kTileN = std::clamp<int64_t>((N + split - 1) / split + 15 & ~int64_t(15), 64, 256);
  if (add.defined() && !add.is_same(out)) out.copy_(add);
  const float *A = a.const_data_ptr<float>(), *Bm = b.const_data_ptr<float>();
  float* C = out.mutable_data_ptr<float>();
  const int64_t tiles_n = (N + kTileN - 1) / kTileN, tiles = (M + kTileM - 1) / kTileM * tiles_n;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t / tiles_n * kTileM, n0 = t % tiles_n * kTileN;
      const int64_t mb = std::min(kTileM, M - m0), nb = std::min(kTileN, N - n0);
      brgemm_blocks(mb, nb, K, lda, ldb, ldc, add.defined(), A + m0 * lda, Bm + n0, C + m0 * ldc + n0);
    }
  });
}

struct CpuLauncher {
  // A few steps of xg (and of its gradient) at a time: ~1 MB, what a core's L2 holds, but at least 512
  // rows: the weight gradients' GEMMs (K = the chunk's rows) accumulate into [I or H, G*H] once per chunk,
  // and with fewer rows that traffic dominates (measured at (50,64,512,512): 2 steps per chunk, 128 rows,
  // 67 ms for dx, dW_ih, dW_hh; 8 steps, 54-57 ms).
  static int64_t chunk_steps(int64_t B, int64_t GH, int64_t elem) {
    B = std::max<int64_t>(1, B);
    return std::max((int64_t(1) << 20) / std::max<int64_t>(1, B * GH * elem), (512 + B - 1) / B);
  }
  static bool wants_persistent(Path path) {
    const auto s = emulated::settings();  // only the tests' emulation: cpu/emulation.h
    return s.on && use_persistent(path, s.by_default);
  }
  static Tensor contiguous(const Tensor& m) { return rnnext::contiguous(m); }
  static Tensor right_operand(const Tensor& m) { return rnnext::contiguous(m, true); }
  // Padded: LSTM fwd+bwd 0.94x time at (100,32,256,256), 0.96x at (50,64,512,512) (interleaved A/B).
  static int64_t gate_stride(int64_t GH, at::ScalarType type) { return type == at::kFloat ? padded_row(GH) : GH; }

  static void gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add) {
    if (out.scalar_type() == at::kFloat && out.stride(1) == 1 && out.numel() > 0 && a.size(1) > 0 && have_brgemm())
      brgemm_gemm(out, a, b, add);
    else
      aten_gemm(out, a, b, add);
  }

  template <typename Cell, typename S, typename A>
  static bool persistent_forward(Path path, const cells::SeqFwd<S, A>& p, const Tensor& w_hh, Tensor& h) {
    return emulated::forward<Cell>(path, p, w_hh, h);
  }
  template <typename Cell, typename S, typename A>
  static bool persistent_backward(Path path, const cells::SeqBwd<S, A>& p, const Tensor& w_hh, Tensor& dh) {
    return emulated::backward<Cell>(path, p, w_hh, dh);
  }

  // f over row b, columns [j0, j1): vectors of the math type (float for 16-bit types), then scalars.
  template <typename F>
  static void apply_row(const F& f, int64_t b, int64_t j0, int64_t j1) {
    using V = at::vec::Vectorized<typename F::acc>;
    int64_t j = j0;
    for (; j + V::size() <= j1; j += V::size()) f.template apply<V>(b, j);
    for (; j < j1; ++j) f.template apply<typename F::acc>(b, j);
  }

  // cells/layernorm.h's row executor: one thread per row, its loops in vectors, then scalars.
  struct VecRow {
    template <typename A, typename Fn>
    void loop(int64_t n, const Fn& fn) const {
      using V = at::vec::Vectorized<A>;
      int64_t k = 0;
      for (; k + V::size() <= n; k += V::size()) fn.template operator()<V>(k);
      for (; k < n; ++k) fn.template operator()<A>(k);
    }
    template <typename A, int M, typename Fn>
    cells::Sums<A, M> sums(int64_t n, const Fn& fn) const {
      using V = at::vec::Vectorized<A>;
      V acc[M];
      A tail[M];
      for (int m = 0; m < M; ++m) acc[m] = V(A(0)), tail[m] = A(0);
      int64_t k = 0;
      for (; k + V::size() <= n; k += V::size()) fn.template operator()<V>(k, acc);
      for (; k < n; ++k) fn.template operator()<A>(k, tail);
      cells::Sums<A, M> out;
      for (int m = 0; m < M; ++m) out.v[m] = cells::Lanes<V>::sum(acc[m]) + tail[m];
      return out;
    }
  };

  template <typename F>
  static void run_rows(c10::Device, int64_t B, const F& f) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f.row(b, VecRow{});
    });
  }

  template <typename F>
  static void run(c10::Device, int64_t B, int64_t H, const F& f) {
    // Rows per task: enough work to pay for waking a thread (the cells cost ~1-4 ns per element).
    const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(H, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) apply_row(f, b, 0, H);
    });
  }

  // The forward's hidden units split over the threads: blocks of `units` (a multiple of 16).
  static std::pair<int64_t, int64_t> unit_blocks(int64_t H) {
    const int64_t threads = at::get_num_threads();
    const int64_t units = ((H + threads - 1) / threads + 15) / 16 * 16;
    return {units, (H + units - 1) / units};
  }
  // W_hh^T [K, G*H] as each thread reads it in the fused regions: [blocks, G, K, units] float, a block's
  // gates contiguous (4-D: the steps run fused; else w_t as given, step by step). Read in place, a gate's
  // columns are rows 4*H floats apart, 4 KB at H = 256: they thrash the L1 sets (measured: 59 us per step
  // at B=32, H=256 for ~23 us of work). Fused: float; 16-bit with the GEMM in float where the step GEMM is
  // small (measured, bf16 LSTM forward vs at::mm per step: 0.35x time at B=8, H=128; 0.99x at B=32, H=256;
  // 1.19x at B=64, H=512, where oneDNN's bf16 instructions win).
  static Tensor step_weights(const Tensor& w_t, int64_t G, int64_t H, int64_t B) {
    const auto type = w_t.scalar_type();
    const int64_t K = w_t.size(0);
    const bool small = B * K * G * H <= (int64_t(1) << 24);
    if (!(type == at::kFloat || (small && at::isReducedFloatingType(type))) || K == 0 || H == 0 || !have_brgemm())
      return w_t;
    const auto [units, blocks] = unit_blocks(H);
    auto packed = at::zeros({blocks, G, K, units}, w_t.options().dtype(at::kFloat));
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t j0 = blk * units, n = std::min(H, j0 + units) - j0;
        packed[blk][g].narrow(1, 0, n).copy_(w_t.narrow(1, g * H + j0, n));
      }
    return packed;
  }

  // The unit blocks an OpenMP thread of a fused region owns, the same at every step (it reads back what
  // it wrote): block k on thread k, or round robin where OpenMP gave the region fewer threads.
  struct Blocks {
    int64_t units, blocks, H, thread = omp_get_thread_num(), team = omp_get_num_threads();
    template <typename F>
    void each(const F& f) const {
      for (int64_t blk = thread; blk < blocks; blk += team) f(blk, blk * units, std::min(H, blk * units + units));
    }
  };

  // Block blk's part of a fused step's cell: its hidden units of every row, or (Rows) its rows whole.
  template <bool Rows, typename F>
  static void cell_part(const F& f, int64_t B, int64_t blk, int64_t blocks, int64_t j0, int64_t j1) {
    if constexpr (Rows) {
      for (int64_t r = B * blk / blocks; r < B * (blk + 1) / blocks; ++r) f.row(r, VecRow{});
    } else {
      for (int64_t r = 0; r < B; ++r) apply_row(f, r, j0, j1);
    }
  }

  // A fused region's GEMM operand in float: 16-bit src converted into thread blk's slice of buf; float as is.
  template <typename S>
  static const float* as_float(const S* src, const Tensor& buf, int64_t blk, int64_t n) {
    if constexpr (std::is_same_v<S, float>) {
      return src;
    } else {
      float* a = buf.mutable_data_ptr<float>() + blk * n;
      at::vec::convert(src, a, n);
      return a;
    }
  }
  // Columns [j0, j1) of B rows (row stride ld) of a float GEMM's output rounded into the 16-bit result.
  template <typename S>
  static void columns_back(const float* src, S* dst, int64_t B, int64_t ld, int64_t j0, int64_t j1) {
    if constexpr (!std::is_same_v<S, float>)
      for (int64_t r = 0; r < B; ++r) at::vec::convert(src + r * ld + j0, dst + r * ld + j0, j1 - j0);
  }

  // Steps t0..t1-1 of the forward (see driver/loops.h). Packed weights: one parallel region for all of
  // them, each thread the GEMM of its hidden units' gate columns then the cell on them while they are in
  // cache, a barrier between steps (a fork/join per step cost ~9% here, perf). Rows: the cell needs
  // every column of its rows, a barrier before it too.
  // 16-bit S: the GEMM in float (the products of 16-bit values are exact in float, as in a 16-bit GEMM
  // with float accumulation, and hg is rounded back to S as such a GEMM's output is): each thread converts
  // h_{t-1} for itself and its columns of hg back. at::mm per step was what made the bf16 LSTM forward
  // 1.3-3.8x torch.nn's here. double: never packed (step_weights), its region not compiled.
  template <bool Rows, typename S, typename MakeF>
  static void gemm_cell_steps(int64_t t0, int64_t t1, Tensor& hg, const Tensor& h, const Tensor& other,
                              const Tensor& w_step, int64_t H, const MakeF& make_f) {
    if (h.size(0) == 0) return;
    if (std::is_same_v<S, double> || w_step.dim() != 4)
      return gemm_cell_each_step<CpuLauncher, Rows>(t0, t1, hg, h, other, w_step, H, make_f);
    if constexpr (!std::is_same_v<S, double>) {
      constexpr bool to_float = !std::is_same_v<S, float>;
      const int64_t B = h.size(0), K = h.size(1), GH = hg.size(1), G = GH / H;
      const auto [units, blocks] = unit_blocks(H);
      const auto fopts = h.options().dtype(at::kFloat);
      const Tensor hf = to_float ? at::empty({blocks, B, K}, fopts) : Tensor(),
                   hgf = to_float ? at::empty({B, GH}, fopts) : hg;
      const float* W = w_step.const_data_ptr<float>();
      float* C = hgf.mutable_data_ptr<float>();
      S* out = hg.mutable_data_ptr<S>();
#pragma omp parallel num_threads(blocks)
      {
        const Blocks mine{units, blocks, H};
        for (int64_t t = t0; t < t1; ++t) {
          const Tensor& prev = t % 2 ? other : h;
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) {
            const float* A = as_float(prev.const_data_ptr<S>(), hf, blk, B * K);
            for (int64_t g = 0; g < G; ++g) {
              brgemm_blocks(B, j1 - j0, K, K, units, GH, false, A, W + (blk * G + g) * K * units, C + g * H + j0);
              columns_back(C + g * H, out + g * H, B, GH, j0, j1);
            }
          });
          if constexpr (Rows) {
#pragma omp barrier
          }
          const auto f = make_f(t, prev, t % 2 ? h : other);
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) { cell_part<Rows>(f, B, blk, blocks, j0, j1); });
#pragma omp barrier
        }
      }
    }
  }

  // Steps t1-1 down to t0 of the backward (see driver/loops.h). Packed weights: one parallel region, each
  // thread the cell of its hidden units, a barrier, then the same units' columns of dh = direct + dhg @ w_hh:
  // the dh and direct each thread's cell reads are what it wrote itself. Rows: a cell reads every column
  // of its rows of dh, a barrier after the GEMM too. 16-bit S: the GEMM in float as in the forward.
  template <bool Rows, typename S, typename MakeF>
  static void cell_gemm_steps(int64_t t0, int64_t t1, Tensor& dh, const Tensor& dhg, const Tensor& direct,
                              const Tensor& w_step, int64_t H, const MakeF& make_f) {
    if (dh.size(0) == 0) return;
    if (std::is_same_v<S, double> || w_step.dim() != 4)
      return cell_gemm_each_step<CpuLauncher, Rows>(t0, t1, dh, dhg, direct, w_step, H, make_f);
    if constexpr (!std::is_same_v<S, double>) {
      constexpr bool to_float = !std::is_same_v<S, float>;
      const int64_t B = dh.size(0), K = dhg.size(2), ld = dhg.stride(1);
      const auto [units, blocks] = unit_blocks(H);
      const auto fopts = dh.options().dtype(at::kFloat);
      const Tensor dgf = to_float ? at::empty({blocks, B, ld}, fopts) : Tensor(),
                   dhf = to_float ? at::empty({B, H}, fopts) : dh;
      const float* W = w_step.const_data_ptr<float>();
      const S *D = dhg.const_data_ptr<S>(), *R = direct.defined() ? direct.const_data_ptr<S>() : nullptr;
      float* C = dhf.mutable_data_ptr<float>();
      S* out = dh.mutable_data_ptr<S>();
#pragma omp parallel num_threads(blocks)
      {
        const Blocks mine{units, blocks, H};
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const auto f = make_f(t);
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) { cell_part<Rows>(f, B, blk, blocks, j0, j1); });
#pragma omp barrier
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) {
            const float* A = as_float(D + (t - t0) * dhg.stride(0), dgf, blk, B * ld);
            if (R)
              for (int64_t r = 0; r < B; ++r) at::vec::convert(R + r * H + j0, C + r * H + j0, j1 - j0);
            brgemm_blocks(B, j1 - j0, K, ld, units, H, R != nullptr, A, W + blk * K * units, C + j0);
            columns_back(C, out, B, H, j0, j1);
          });
          if constexpr (Rows) {
#pragma omp barrier
          }
        }
      }
    }
  }
};

// Zoneout's keep masks: element i is 1 where half i % 2 (low, high) of splitmix64's output for counter
// i / 2 is below p * 2^32. Counter-based, so the threads fill their ranges independently and one draw
// from torch's generator (the seed) reproduces a mask: bernoulli_ on torch's CPU generator, one thread,
// took 7 ms of the zoneout LSTM's 17 ms forward at (100,32,256,256). rnnext.reference.keep_mask is the
// same in PyTorch.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline Tensor keep_mask(const Tensor& seed, at::IntArrayRef size, double p, at::ScalarType dtype) {
  const auto name = [](at::ScalarType t) { return "torch." + std::string(std::get<0>(c10::getDtypeNames(t))); };
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "keep_mask: expected seed a one-element int64 CPU tensor, got shape ", seed.sizes(), ", dtype ",
              name(seed.scalar_type()), ", device ", seed.device());
  TORCH_CHECK(p >= 0 && p <= 1, "keep_mask: expected p in [0, 1], got ", p);
  TORCH_CHECK(at::isFloatingType(dtype), "keep_mask: expected a floating dtype, got ", name(dtype));
  auto out = at::empty(size, seed.options().dtype(dtype));
  const uint64_t s = uint64_t(seed.item<int64_t>()), below = uint64_t(std::ldexp(p, 32));  // p = 1: 2^32
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "keep_mask", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (n + 1) / 2, 1 << 14, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < std::min(k1, n / 2); ++k) {
        const uint64_t r = splitmix64(s + uint64_t(k) * 0x9E3779B97F4A7C15ull);
        o[2 * k] = scalar_t((r & 0xFFFFFFFFull) < below);
        o[2 * k + 1] = scalar_t((r >> 32) < below);
      }
      if (n % 2 && k1 == (n + 1) / 2)
        o[n - 1] = scalar_t((splitmix64(s + uint64_t(n / 2) * 0x9E3779B97F4A7C15ull) & 0xFFFFFFFFull) < below);
    });
  });
  return out;
}


TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  register_ops<CpuLauncher>(m);
  m.impl("keep_mask", &keep_mask);
}

static const bool emulation_status_added = persistent::add_status_check(&emulated::check);

}  // namespace rnnext
