// The CPU's GEMMs: oneDNN's brgemm micro-kernel (ATen's cpublas) tiled and threaded, and the transposing
// copies of their operands.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <unistd.h>

#include <algorithm>

#include "driver/common.h"

namespace rnnext {

// float GEMMs through oneDNN's brgemm micro-kernel (ATen's cpublas), tiled and threaded here: at::mm's MKL ran
// the step GEMMs at half its speed on the AMD EPYC measured (docs/design.md). float only (16-bit needs a
// packed B; double has no brgemm). Whether this torch and CPU have it is probed once.
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

// dst[j * ldo + i] = src[i * ld + j] for i < M, j < N. at::vec's transpose_mxn<float> of any size is register
// transposes only on AVX-512 (a scalar loop elsewhere); AVX2 has the fixed 8x8 one.
inline void transpose(const float* src, int64_t ld, float* dst, int64_t ldo, int64_t M, int64_t N) {
#ifdef CPU_CAPABILITY_AVX2
  const int64_t M8 = M & ~int64_t(7), N8 = N & ~int64_t(7);
  for (int64_t i = 0; i < M8; i += 8)
    for (int64_t j = 0; j < N8; j += 8)
      at::vec::transpose_mxn<float, 8, 8>(src + i * ld + j, ld, dst + j * ldo + i, ldo);
  for (int64_t i = 0; i < M; ++i)  // the ragged edges
    for (int64_t j = i < M8 ? N8 : 0; j < N; ++j) dst[j * ldo + i] = src[i * ld + j];
#else
  at::vec::transpose_mxn<float>(src, ld, dst, ldo, int(M), int(N));
#endif
}

// The row stride of a float matrix that brgemm reads as a plain B (backward's gate gradients): rows of a
// multiple of 4 KB get 64 bytes more, because brgemm reads a column block down B's rows and rows 4 KB apart
// share L1 sets (docs/design.md, "One layer-direction").
inline int64_t padded_row(int64_t n) { return n % 1024 == 0 ? n + 16 : n; }

// m.contiguous(); for a transposed float matrix (stride(0) == 1) register transposes in 64x64 blocks
// over the threads (ATen's transposing copy is several times slower).
inline Tensor contiguous(const Tensor& m) {
  if (m.scalar_type() != at::kFloat || m.dim() != 2 || m.stride(1) == 1 || m.stride(0) != 1) return m.contiguous();
  const int64_t M = m.size(0), N = m.size(1);
  auto out = at::empty({M, N}, m.options());
  float* dst = out.mutable_data_ptr<float>();
  constexpr int64_t kBlock = 64;
  const int64_t ld = m.stride(1), blocks_n = (N + kBlock - 1) / kBlock;
  const float* src = m.const_data_ptr<float>();  // m[i][j] at src[j * ld + i]
  at::parallel_for(0, (M + kBlock - 1) / kBlock * blocks_n, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk / blocks_n * kBlock, j0 = blk % blocks_n * kBlock;
      transpose(src + j0 * ld + i0, ld, dst + i0 * N + j0, N, std::min(kBlock, N - j0), std::min(kBlock, M - i0));
    }
  });
  return out;
}

// The floats of brgemm's B block: a quarter of a core's L2 (what the two AMD EPYCs measured ran best with, or within
// 2% of it: docs/design.md), 64-512 KB; an L2 of 1 MB where sysconf does not know.
inline int64_t b_block_floats() {
  static const int64_t floats = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long l2 = 0;
#endif
    return std::clamp<int64_t>((l2 > 0 ? l2 : 1 << 20) / 4 / int64_t(sizeof(float)), 1 << 14, 1 << 17);
  }();
  return floats;
}

// C (+)= A[M, K] @ B[K, N], row-major, K in blocks whose B fits b_block_floats: a brgemm call over a larger B
// re-streams it from L3 for each block of rows (docs/design.md).
inline void brgemm_blocks(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                          const float* A, const float* B, float* C) {
  const int64_t floats = b_block_floats();
  const int64_t block = K * N <= floats ? K : std::max<int64_t>(64, floats / N & ~int64_t(63));
  for (int64_t k0 = 0; k0 < K; k0 += block)
    at::native::cpublas::brgemm(M, N, std::min(block, K - k0), lda, ldb, ldc, add || k0 > 0, A + k0, B + k0 * ldb, C,
                                false);
}

// A float B [K, N] in panels: [panels, K, kPanel], panel p columns [p * kPanel, p * kPanel + kPanel), the last
// one's tail zero. brgemm reads a K block of a panel (kPanelDepth x kPanel floats: 32 KB, L1) as one stream; the
// same block of a plain matrix has its rows a page apart (docs/design.md measures both).
constexpr int64_t kPanel = 32, kPanelDepth = 256;

// A transposed b (stride(0) == 1: the weights' transposes) is transposed straight into its panels.
inline Tensor pack_panels(const Tensor& b_) {
  const bool transposed = b_.stride(0) == 1 && b_.stride(1) != 1;
  const auto b = transposed || b_.stride(1) == 1 ? b_ : b_.contiguous();
  const int64_t K = b.size(0), N = b.size(1), ld = transposed ? b.stride(1) : b.stride(0),
                P = (N + kPanel - 1) / kPanel;
  auto out = at::empty({P, K, kPanel}, b.options());
  const float* src = b.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, w = std::min(kPanel, N - n0);
      float* panel = dst + p * K * kPanel;
      if (transposed) transpose(src + n0 * ld, ld, panel, kPanel, w, K);
      for (int64_t k = 0; k < K; ++k) {
        if (!transposed) std::copy_n(src + k * ld + n0, w, panel + k * kPanel);
        std::fill(panel + k * kPanel + w, panel + (k + 1) * kPanel, 0.f);
      }
    }
  });
  return out;
}

// C[M, N] (+)= A[M, K] @ columns [c0, c0 + N) of a panel matrix, panel p at P + p * pstride (row 0 there: P may
// point past the panels' first rows), K in blocks of kPanelDepth, each over the panels the columns meet.
inline void panel_blocks(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldc, bool add, const float* A,
                         const float* P, int64_t pstride, int64_t c0, float* C) {
  for (int64_t k0 = 0; k0 < K; k0 += kPanelDepth) {
    const int64_t kb = std::min(kPanelDepth, K - k0);
    for (int64_t c = c0; c < c0 + N;) {
      const int64_t lo = c % kPanel, w = std::min(kPanel - lo, c0 + N - c);
      at::native::cpublas::brgemm(M, w, kb, lda, kPanel, ldc, add || k0 > 0, A + k0,
                                  P + c / kPanel * pstride + k0 * kPanel + lo, C + (c - c0), false);
      c += w;
    }
  }
}

// out = add + a @ b (add may be out itself): tiles of kTileM x kTileN over the threads, K in blocks
// accumulated in place; b a plain matrix or pack_panels' (3-D), which a plain one of at least kTileM rows of a
// is packed into first. brgemm wants row-major operands: a transposed view is copied first.
inline void brgemm_gemm(Tensor& out, const Tensor& a_, const Tensor& b_, const Tensor& add) {
  constexpr int64_t kTileM = 128;  // 64-128 x 128-256 within 5% of each other (docs/design.md)
  const auto a = a_.stride(1) == 1 ? a_ : contiguous(a_);
  const bool panels = b_.dim() == 3 || a.size(0) >= kTileM;
  const auto b = b_.dim() == 3 ? b_ : panels ? pack_panels(b_) : b_.stride(1) == 1 ? b_ : contiguous(b_);
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1), lda = a.stride(0), ldc = out.stride(0);
  const int64_t ldb = panels ? kPanel : b.stride(0);
  // Columns per tile: 256, fewer (down to 64) where too few row tiles keep every thread busy (the step
  // GEMMs have M = batch).
  const int64_t row_tiles = (M + kTileM - 1) / kTileM, threads = at::get_num_threads();
  const int64_t split = row_tiles >= threads ? 1 : (threads + row_tiles - 1) / row_tiles;
  const int64_t kTileN = std::clamp<int64_t>(((N + split - 1) / split + kPanel - 1) & ~(kPanel - 1), 64, 256);
  if (add.defined() && !add.is_same(out)) out.copy_(add);
  const float *A = a.const_data_ptr<float>(), *Bm = b.const_data_ptr<float>();
  float* C = out.mutable_data_ptr<float>();
  const int64_t tiles_n = (N + kTileN - 1) / kTileN, tiles = (M + kTileM - 1) / kTileM * tiles_n;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t / tiles_n * kTileM, n0 = t % tiles_n * kTileN;
      const int64_t mb = std::min(kTileM, M - m0), nb = std::min(kTileN, N - n0);
      if (panels)
        panel_blocks(mb, nb, K, lda, ldc, add.defined(), A + m0 * lda, Bm, K * kPanel, n0, C + m0 * ldc + n0);
      else
        brgemm_blocks(mb, nb, K, lda, ldb, ldc, add.defined(), A + m0 * lda, Bm + n0, C + m0 * ldc + n0);
    }
  });
}

}  // namespace rnnext
