// The persistent kernel's work per CTA and step, as __host__ __device__ functions of (CTA k, thread
// tid of nthreads): the CUDA kernels (cuda/persistent.cuh) run them with real threads, a block sync
// between phases and a grid barrier between steps; the CPU emulation (cpu/kernels.cpp) runs them with
// one thread, CTA after CTA, which is the same computation. So the CPU tests check everything here
// but the CUDA-only parts: the barrier and the tensor-core tile (mma_tile's device branch).
//
// CTA k owns the hidden units [k*units, min((k+1)*units, H)). Per step it computes on chip
//   out[B, N] = A[B, K] x Bt[N, K]^T
//   forward:  A = h_prev [B, H], K = H; Bt = the W_hh rows of its units, N = G*units (row n = g*units + u);
//             out -> its columns of hg [B, G*H], then the cell (cells/seq.h) on its units
//   backward: the cell backward on its units writes their columns of dgates[t]; after the grid barrier
//             A = dgates[t] [B, G*H], K = G*H; Bt = the W_hh columns of its units, N = units;
//             out + direct -> its columns of dh
// Shared memory: Bt [Np, ldb] for the whole sequence, A in chunks of kc columns [Bp, lda], and the
// result in acc_t [Bp, lds]. 16-bit types multiply on tensor cores in 16x16x16 tiles (Bp, Np, Kp, kc
// multiples of 16, zero padded); float and double with one FMA per term.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cells/seq.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace rnnext {
namespace persistent {

enum class Dir : int32_t { Forward = 0, Backward = 1 };

struct Plan {
  int32_t fits;                // 0: does not fit on chip (run per step)
  int32_t ctas, threads, G;
  int32_t mma;                 // tensor-core tiles (16-bit types)
  int32_t dir;                 // Dir
  int64_t units;               // hidden units per CTA; the last CTA may have fewer
  int64_t B, H, K, N;          // the per-CTA GEMM
  int64_t Bp, Np, Kp, kc;      // padded to the tile; A's chunk of columns
  int64_t lda, ldb, lds;       // row strides (elements) of A, Bt, the result
  int64_t off_a, off_s, smem;  // byte offsets in dynamic shared memory (Bt at 0); total bytes
};

template <typename S>
constexpr bool uses_mma = sizeof(S) == 2;

RNNEXT_HD int64_t first_unit(const Plan& pl, int64_t k) { return k * pl.units; }
RNNEXT_HD int64_t units_of(const Plan& pl, int64_t k) {
  const int64_t left = pl.H - first_unit(pl, k);
  return left < pl.units ? left : pl.units;
}

// W_hh [G*H, H] (torch's gate-major rows) -> this CTA's Bt, zero padded. Once per launch.
template <typename S>
RNNEXT_HD void load_weights(const Plan& pl, int64_t k, const S* w_hh, S* bt, int64_t tid, int64_t nthreads) {
  const int64_t j0 = first_unit(pl, k), nu = units_of(pl, k);
  for (int64_t i = tid; i < pl.Np * pl.Kp; i += nthreads) {
    const int64_t n = i / pl.Kp, c = i % pl.Kp;
    S v = S(0.f);
    if (c < pl.K) {
      if (pl.dir == int32_t(Dir::Forward)) {
        const int64_t g = n / pl.units, u = n % pl.units;
        if (g < pl.G && u < nu) v = w_hh[(g * pl.H + j0 + u) * pl.H + c];
      } else if (n < nu) {
        v = w_hh[c * pl.H + j0 + n];
      }
    }
    bt[n * pl.ldb + c] = v;
  }
}

// Columns [k0, k0 + kc) of a row-major [B, K] matrix -> A [Bp, lda], zero padded.
template <typename S>
RNNEXT_HD void load_chunk(const Plan& pl, const S* src, int64_t k0, S* a, int64_t tid, int64_t nthreads) {
  for (int64_t i = tid; i < pl.Bp * pl.kc; i += nthreads) {
    const int64_t b = i / pl.kc, c = i % pl.kc;
    a[b * pl.lda + c] = b < pl.B && k0 + c < pl.K ? src[b * pl.K + k0 + c] : S(0.f);
  }
}

template <typename S, typename A>
RNNEXT_HD void fma_chunk(const Plan& pl, const S* a, const S* bt, int64_t k0, int64_t klen, A* out, bool first,
                         int64_t tid, int64_t nthreads) {
  for (int64_t i = tid; i < pl.B * pl.N; i += nthreads) {
    const int64_t b = i / pl.N, n = i % pl.N;
    const S *ar = a + b * pl.lda, *br = bt + n * pl.ldb + k0;
    A acc = first ? A(0) : out[b * pl.lds + n];
    for (int64_t c = 0; c < klen; ++c) acc += A(ar[c]) * A(br[c]);
    out[b * pl.lds + n] = acc;
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define RNNEXT_WMMA 1
template <typename S>
struct Wmma;
template <>
struct Wmma<c10::Half> {
  using T = __half;
};
template <>
struct Wmma<c10::BFloat16> {
  using T = __nv_bfloat16;
};
#endif

// c[16, 16] (+)= a[16, k] x b[16, k]^T, k a multiple of 16; a, b, c 32-byte aligned, lda/ldb multiples
// of 8, ldc of 4. On the device (sm_80+, bf16 and fp16 tensor cores): one warp, all 32 lanes; on
// the host: plain loops.
template <typename S>
RNNEXT_HD void mma_tile(const S* a, int64_t lda, const S* b, int64_t ldb, float* c, int64_t ldc, int64_t k,
                        bool first) {
#if defined(RNNEXT_WMMA)
  using namespace nvcuda;
  using T = typename Wmma<S>::T;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  if (first)
    wmma::fill_fragment(acc, 0.f);
  else
    wmma::load_matrix_sync(acc, c, unsigned(ldc), wmma::mem_row_major);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  for (int64_t kk = 0; kk < k; kk += 16) {
    wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(a + kk), unsigned(lda));
    wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(b + kk), unsigned(ldb));
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(c, acc, unsigned(ldc), wmma::mem_row_major);
#else
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = first ? 0.f : c[i * ldc + j];
      for (int64_t kk = 0; kk < k; ++kk) acc += float(a[i * lda + kk]) * float(b[j * ldb + kk]);
      c[i * ldc + j] = acc;
    }
#endif
}

// The 16x16 output tiles are dealt to the warps (on the host: one "warp", thread 0).
template <typename S>
RNNEXT_HD void mma_chunk(const Plan& pl, const S* a, const S* bt, int64_t k0, int64_t klen, float* out, bool first,
                         int64_t tid, int64_t nthreads) {
  const int64_t warp = tid / 32, warps = nthreads < 32 ? 1 : nthreads / 32, nt = pl.Np / 16;
  const int64_t k = (klen + 15) / 16 * 16;
  for (int64_t tile = warp; tile < pl.Bp / 16 * nt; tile += warps) {
    const int64_t m0 = tile / nt * 16, n0 = tile % nt * 16;
    mma_tile(a + m0 * pl.lda, pl.lda, bt + n0 * pl.ldb + k0, pl.ldb, out + m0 * pl.lds + n0, pl.lds, k, first);
  }
}

// out = A x Bt^T, A streamed from the row-major [B, K] src; sync.block() between phases.
template <typename S, typename A, typename Sync>
RNNEXT_HD void cta_gemm(const Plan& pl, const S* src, unsigned char* smem, int64_t tid, int64_t nthreads,
                        const Sync& sync) {
  const S* bt = reinterpret_cast<const S*>(smem);
  S* a = reinterpret_cast<S*>(smem + pl.off_a);
  A* out = reinterpret_cast<A*>(smem + pl.off_s);
  for (int64_t k0 = 0; k0 < pl.K; k0 += pl.kc) {
    load_chunk(pl, src, k0, a, tid, nthreads);
    sync.block();
    const int64_t klen = pl.K - k0 < pl.kc ? pl.K - k0 : pl.kc;
    if constexpr (uses_mma<S>)
      mma_chunk(pl, a, bt, k0, klen, out, k0 == 0, tid, nthreads);
    else
      fma_chunk(pl, a, bt, k0, klen, out, k0 == 0, tid, nthreads);
    sync.block();
  }
}

// f.apply over this CTA's units, every row.
template <typename A, typename F>
RNNEXT_HD void apply_units(const Plan& pl, int64_t k, const F& f, int64_t tid, int64_t nthreads) {
  const int64_t j0 = first_unit(pl, k), nu = units_of(pl, k);
  for (int64_t i = tid; i < pl.B * nu; i += nthreads) f.template apply<A>(i / nu, j0 + i % nu);
}

// Step t of the forward on CTA k: h_prev -> hg's columns of its units -> the cell -> h (its units).
template <typename Cell, typename S, typename A, typename Sync>
RNNEXT_HD void forward_step(const Plan& pl, const cells::SeqFwd<S, A>& p, int64_t k, int64_t t, const S* h_prev,
                            S* h, S* hg, unsigned char* smem, int64_t tid, int64_t nthreads, const Sync& sync) {
  cta_gemm<S, A>(pl, h_prev, smem, tid, nthreads, sync);
  const A* out = reinterpret_cast<const A*>(smem + pl.off_s);
  const int64_t j0 = first_unit(pl, k), nu = units_of(pl, k), G = pl.G;
  for (int64_t i = tid; i < pl.B * G * nu; i += nthreads) {
    const int64_t b = i / (G * nu), g = i % (G * nu) / nu, u = i % nu;
    hg[(b * G + g) * pl.H + j0 + u] = S(out[b * pl.lds + g * pl.units + u]);
  }
  sync.block();
  apply_units<A>(pl, k, Cell::fwd(p, t, hg, h_prev, h), tid, nthreads);
}

// Step t of the backward on CTA k, first half: the cell backward of its units (dh: its columns).
template <typename Cell, typename S, typename A>
RNNEXT_HD void backward_cell(const Plan& pl, const cells::SeqBwd<S, A>& p, int64_t k, int64_t t, const S* dh,
                             int64_t tid, int64_t nthreads) {
  apply_units<A>(pl, k, Cell::bwd(p, t, dh, false), tid, nthreads);
}

// Second half, after every CTA's first half: dh (its columns) = direct + dgates[t] x W_hh.
template <typename S, typename A, typename Sync>
RNNEXT_HD void backward_gemm(const Plan& pl, const cells::SeqBwd<S, A>& p, int64_t k, int64_t t, S* dh,
                             unsigned char* smem, int64_t tid, int64_t nthreads, const Sync& sync) {
  cta_gemm<S, A>(pl, p.dhg + cells::held(p, t) * pl.B * pl.K, smem, tid, nthreads, sync);
  const A* out = reinterpret_cast<const A*>(smem + pl.off_s);
  const int64_t j0 = first_unit(pl, k), nu = units_of(pl, k);
  for (int64_t i = tid; i < pl.B * nu; i += nthreads) {
    const int64_t b = i / nu, j = j0 + i % nu;
    A v = out[b * pl.lds + i % nu];
    if (p.direct) v += A(p.direct[b * pl.H + j]);
    dh[b * pl.H + j] = S(v);
  }
  sync.block();
}

}  // namespace persistent
}  // namespace rnnext
