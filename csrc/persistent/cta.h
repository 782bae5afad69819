// The persistent kernel's work per CTA and step, as __host__ __device__ phases of a CTA's threads: the CUDA
// kernels (cuda/persistent.cuh) run them with 256 real threads, a block sync between phases and a grid
// barrier between steps; the CPU emulation (cpu/emulation.cpp) runs the same phases thread after thread,
// warp-wide operations (the tensor-core MMA) over the warp's 32 register sets, CTA after CTA, in an order
// the device could also take. So the CPU tests check everything here but the barrier's atomics, the
// asynchronous copies' hardware and the MMA instruction (whose fragment layouts the emulation reproduces).
//
// CTA k owns the hidden units [k*units, min((k+1)*units, H)). Per step it computes on tensor cores
//   out[B, N] = A[B, K] x Bt[N, K]^T
//   forward:  A = h_prev [B, H], K = H; Bt = the W_hh rows of its units, N = G*units (row n = g*units + u);
//             the cell of its units from out (+ xg[t], the biases), h_t of its units to the others
//   backward: the cell backward of its units writes their columns of dhg[t]; after the grid barrier
//             A = dhg[t] [B, G*H], K = G*H; Bt = the W_hh columns of its units, N = units;
//             dh of its units = direct + out
// Head-wise (a block-diagonal W_hh) where a CTA's units are whole heads ("local"), a CTA reads only what it
// wrote itself: K is its own units (forward: its columns of h; backward: its G gates' columns of dhg[t]), which
// its cell writes straight into A, and there is no grid barrier (a plain launch, any number of CTAs).
// The 8 warps split K (k-tiles [w*KT, (w+1)*KT)), or (local, where N is wide and K narrow) wn groups of them
// split N and the 8/wn warps of a group K: each warp keeps its part of Bt in registers as MMA fragments for
// the whole sequence and adds its partial products of every output tile; the partials meet in shared
// memory, where the cell's threads sum them. A thread's cell elements (row, unit) are the
// same at every step, so the carried states (and the biases, and the lengths) stay in its registers; the
// per-step inputs of its units (xg, the zoneout mask; backward: dy, saved, the states before the step)
// come as 16-byte asynchronous copies into shared memory, prefetched for the next step before the wait.
// Shared memory: A [Bp, lda] (the warps' slices), partial sums [warps, Bp, ldr] float, the element tiles.
// 16-bit types: mma m16n8k16 (k-tile 16); float: TF32 mma m16n8k8 (k-tile 8), where torch allows TF32.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "cells/seq_args.h"

namespace rnnext {
namespace persistent {

enum class Dir : int32_t { Forward = 0, Backward = 1 };
enum class Mma : int32_t { None = 0, Half = 1, TF32 = 2 };  // Half: fp16 and bf16

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kMaxMT = 4;  // m-tiles of 16 rows: B <= 64

// What a thread keeps in registers, by direction: Bt's fragments (KT k-tiles x NT n-tiles of 8 columns),
// accumulators (CH chains: backward's one n-tile is split over two, so that its MMAs do not all wait for
// each other), cell elements (row, unit) per thread.
template <Dir D>
struct Shape;
template <>
struct Shape<Dir::Forward> {
  static constexpr int KT = 8, NT = 4, CH = 1, E = 2;
};
template <>
struct Shape<Dir::Backward> {
  static constexpr int KT = 32, NT = 1, CH = 2, E = 1;
};

struct Plan {
  int32_t fits;  // 0: does not fit on chip (run per step)
  int32_t ctas, threads, G, dir, mma;
  int32_t units, B, H, K, N;   // units per CTA (the last CTA may have fewer); the per-CTA GEMM
  int32_t MT, NT, KT, ktile;   // m-tiles, n-tiles, k-tiles per warp, the k-tile (16 or 8)
  int32_t lda, ldr;            // row strides of A (elements) and of the partial sums (floats)
  int32_t parts;               // element tiles' values per (row, unit) and step, in and out
  int32_t off_r, off_x, smem;  // bytes: A at 0, partial sums, element tiles (and the biases); total
  int32_t elems;               // cell elements per thread
  int32_t head, local;         // units per head (H: dense); 1: CTAs of whole heads, no grid barrier
  int32_t wn, kshift;          // n-groups of warps; log2 of the warps of one (8 / wn), each a k-group
};

// The warps of an n-group (each splits K), and warp w's k-group and n-group (shifts: no division per step).
RNNEXT_HD int32_t k_warps(const Plan& pl) { return 1 << pl.kshift; }
RNNEXT_HD int32_t k_group(const Plan& pl, int warp) { return warp & (k_warps(pl) - 1); }
RNNEXT_HD int32_t n_group(const Plan& pl, int warp) { return warp >> pl.kshift; }

template <typename S>
constexpr Mma mma_of = sizeof(S) == 2   ? Mma::Half
                       : sizeof(S) == 4 ? Mma::TF32
                                        : Mma::None;

RNNEXT_HD int32_t first_unit(const Plan& pl, int32_t k) { return k * pl.units; }
RNNEXT_HD int32_t units_of(const Plan& pl, int32_t k) {
  const int32_t left = pl.H - first_unit(pl, k);
  return left < pl.units ? left : pl.units;
}

// ---- registers as the tensor cores see them ------------------------------------------------------------

template <typename S>
RNNEXT_HD uint16_t bits16(S v) {
  return v.x;
}
template <typename S>
RNNEXT_HD uint32_t pack2(S lo, S hi) {
  return uint32_t(bits16(lo)) | uint32_t(bits16(hi)) << 16;
}

// float -> TF32 (round to nearest, ties away from zero, 10 mantissa bits), as cvt.rna.tf32.f32.
RNNEXT_HD uint32_t tf32(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x7f800000u) == 0x7f800000u ? u : (u + 0x1000u) & 0xffffe000u;
#endif
}

// Element (r, c) of a row-major tile as the A or Bt operand's 32-bit register: 16-bit types pack (c, c+1).
template <typename S>
RNNEXT_HD uint32_t operand(const S* p, int32_t ld, int32_t r, int32_t c) {
  if constexpr (sizeof(S) == 2)
    return pack2(p[r * ld + c], p[r * ld + c + 1]);
  else
    return tf32(float(p[r * ld + c]));
}

// Fragment layouts (PTX ISA, mma.m16n8k16 / m16n8k8 with .row.col): lane = 4 * g + q. Register i of A holds
// (row g + 8 (i & 1), column 2q + 8 (i >> 1)) for 16-bit (pairs), (g + 8 (i & 1), q + 4 (i >> 1)) for TF32;
// register i of B = Bt^T holds Bt's (row g, column 2q + 8i) / (g, q + 4i); accumulator i: (g + 8 (i >> 1),
// 2q + (i & 1)).
template <typename S>
RNNEXT_HD void a_fragment(const S* a, int32_t lda, int32_t m0, int32_t k0, int lane, uint32_t* f) {
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    f[i] = sizeof(S) == 2 ? operand(a, lda, m0 + g + 8 * (i & 1), k0 + 2 * q + 8 * (i >> 1))
                          : operand(a, lda, m0 + g + 8 * (i & 1), k0 + q + 4 * (i >> 1));
}
template <typename S>
RNNEXT_HD void b_fragment(const S* bt, int32_t ldb, int32_t n0, int32_t k0, int lane, uint32_t* f) {
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i)
    f[i] = sizeof(S) == 2 ? operand(bt, ldb, n0 + g, k0 + 2 * q + 8 * i) : operand(bt, ldb, n0 + g, k0 + q + 4 * i);
}

// c += a x b for one m16n8 tile, over n lanes' registers (device: n = 1, this lane's, on the tensor cores;
// host: n = 32, the warp's, emulated). a[l * 4], b[l * bs], c[l * cs]: lane l's fragments.
template <typename S>
RNNEXT_HD void mma(int n, const uint32_t* a, const uint32_t* b, int32_t bs, float* c, int32_t cs) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<S, c10::BFloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else if constexpr (std::is_same_v<S, c10::Half>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // no plan below sm_80 (persistent/plan.h)
#endif
#else
  constexpr bool half = sizeof(S) == 2;
  constexpr int K = half ? 16 : 8;
  auto value = [](uint32_t reg, int which) {
    if constexpr (sizeof(S) == 2) {
      return float(S(uint16_t(reg >> (16 * which)), S::from_bits()));
    } else {
      float f;
      std::memcpy(&f, &reg, 4);
      return f;
    }
  };
  // (lane, register, half) of A's (r, k), B's (k, n); C's (r, n)
  auto av = [&](int r, int k) {
    const int lane = (r % 8) * 4 + (half ? k % 8 / 2 : k % 4), reg = r / 8 + 2 * (half ? k / 8 : k / 4);
    return value(a[lane * 4 + reg], half ? k % 2 : 0);
  };
  auto bv = [&](int k, int col) {
    const int lane = col * 4 + (half ? k % 8 / 2 : k % 4), reg = half ? k / 8 : k / 4;
    return value(b[lane * bs + reg], half ? k % 2 : 0);
  };
  float d[16][8];
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 8; ++col) {
      float acc = c[((r % 8) * 4 + col / 2) * cs + 2 * (r / 8) + col % 2];
      for (int k = 0; k < K; ++k) acc += av(r, k) * bv(k, col);
      d[r][col] = acc;
    }
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 8; ++col) c[((r % 8) * 4 + col / 2) * cs + 2 * (r / 8) + col % 2] = d[r][col];
  (void)n;
#endif
}

// ---- asynchronous copies --------------------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1 (.cg): other CTAs' writes of this step are in L2, not in this SM's
// L1. Both addresses 16-byte aligned.
RNNEXT_HD void copy16(void* smem, const void* global) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(global));
#else
  std::memcpy(smem, global, 16);
#endif
}
// 16 bytes, plainly (both addresses 16-byte aligned).
RNNEXT_HD void move16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  std::memcpy(dst, src, 16);
#endif
}
RNNEXT_HD void copies_issued() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;");
#endif
}
RNNEXT_HD void copies_done() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Rows [0, rows) of a row-major [rows, ld_src] global matrix, columns [c0, c0 + n), to a shared [., ld_dst]
// tile at column c0, by `lanes` threads from `lane` (n, c0, the strides: multiples of 16 bytes).
template <typename S>
RNNEXT_HD void stage_rows(const S* src, int32_t ld_src, S* dst, int32_t ld_dst, int32_t rows, int32_t c0, int32_t n,
                          int lane, int lanes) {
  constexpr int32_t v = 16 / sizeof(S);
  const int32_t per_row = n / v;
  for (int32_t i = lane; i < rows * per_row; i += lanes) {
    const int32_t r = i / per_row, c = c0 + i % per_row * v;
    copy16(dst + r * ld_dst + c, src + r * ld_src + c);
  }
}

// ---- what the CTAs share: the grid barrier's arrivals, the error word ---------------------------------

// Per launch. arrivals: barrier s waits for (s + 1) * ctas (64-bit: T * ctas cannot wrap); error: nonzero
// once a CTA gave up waiting (mapped host memory on CUDA: the host reads it without a sync).
struct Grid {
  unsigned long long* arrivals;
  int* error;
  unsigned long long ctas;
  long long timeout_ns;
};

// ---- what every direction's CTA does the same way -----------------------------------------------------

// The element tiles of a step in shared memory: per stream [rows][units] of S, one after the other.
// Forward in: xg's G gates, zoneout's ZONED keep weights (with a mask); out: y, saved, the other states.
template <typename Cell>
RNNEXT_HD constexpr int32_t forward_parts() {
  return Cell::G + Cell::ZONED + 1 + Cell::SAVED + Cell::Z - 1;
}
// Backward in: dy, saved, h before the step (cells that read it), the other states before the step, the
// output (cells that read it), zoneout's keep weights.
template <typename Cell>
RNNEXT_HD constexpr int32_t backward_parts() {
  return 1 + Cell::SAVED + (Cell::reads_h_prev ? 1 : 0) + (Cell::Z - 1) + (Cell::reads_out ? 1 : 0) + Cell::ZONED;
}

using cells::at_least_one;

// This thread's cell elements: element e is the CTA's (row, unit) tid + e * threads, the same every step.
template <int E>
struct Elements {
  int32_t row[E], unit[E], len[E];  // row -1: no element; len: the row's length
  RNNEXT_HD void assign(const Plan& pl, int32_t nu, const int64_t* lengths, int32_t T, int tid) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int32_t i = tid + e * pl.threads;
      row[e] = e < pl.elems && i < pl.B * nu ? i / nu : -1;
      unit[e] = i % nu;
      len[e] = row[e] >= 0 && lengths ? int32_t(lengths[row[e]] < T ? lengths[row[e]] : T) : T;
    }
  }
};

// Per warp: out (+)= A x Bt^T over the warp's k-tiles, its partial sums of each m-tile into its k-group's slice
// of the partial sums [k-groups][MT * 16][ldr], at its n-group's columns. Bt's fragments are in the lanes' registers (b[kt][nt][2]), A in
// shared memory. r: the register sets of N lanes from tid's (device: N = 1, this thread's; emulation: the
// warp's 32).
template <Dir D, int N, typename S, typename Regs>
RNNEXT_HD void multiply(const Plan& pl, const S* a, float* partials, Regs* r, int tid) {
  constexpr int KT = Shape<D>::KT, NT = Shape<D>::NT, CH = Shape<D>::CH;
  constexpr int32_t stride = int32_t(sizeof(Regs) / 4);
  const int warp = tid / 32, kg = k_group(pl, warp), n0 = n_group(pl, warp) * pl.NT * 8;
  float* out = partials + kg * pl.MT * 16 * pl.ldr + n0;
  uint32_t frag[N * 4];
  for (int32_t mt = 0; mt < pl.MT; ++mt) {
    for (int l = 0; l < N; ++l)
#pragma unroll
      for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) r[l].acc[c][nt][i] = 0.f;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int32_t k0 = (kg * pl.KT + kt) * pl.ktile;
      if (kt >= pl.KT || k0 >= pl.K) continue;
      for (int l = 0; l < N; ++l) a_fragment(a, pl.lda, mt * 16, k0, (tid + l) % 32, frag + 4 * l);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        if (nt < pl.NT) mma<S>(N, frag, &r[0].b[kt][nt][0], stride, &r[0].acc[kt % CH][nt][0], stride);
    }
    for (int l = 0; l < N; ++l) {
      const int lane = (tid + l) % 32, g = lane / 4, q = lane % 4;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        if (nt < pl.NT)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            float v = 0.f;
#pragma unroll
            for (int c = 0; c < CH; ++c) v += r[l].acc[c][nt][i];
            out[(mt * 16 + g + 8 * (i >> 1)) * pl.ldr + nt * 8 + 2 * q + (i & 1)] = v;
          }
    }
  }
}

// The sum over the k-groups of partial sums' (row, column).
RNNEXT_HD float warp_sum(const Plan& pl, const float* partials, int32_t row, int32_t col) {
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w)
    if (w < k_warps(pl)) sum += partials[(w * pl.MT * 16 + row) * pl.ldr + col];
  return sum;
}

// A's zero padding (rows >= B, columns >= K): never written again.
template <typename S>
RNNEXT_HD void pad_a(const Plan& pl, S* a, int tid) {
  const int32_t rows = pl.MT * 16;
  for (int32_t i = tid; i < rows * pl.lda; i += pl.threads)
    if (i / pl.lda >= pl.B || i % pl.lda >= pl.K) a[i] = S(0.f);
}

// This warp's k-group's slice of A, columns [kg*KT*ktile, (kg+1)*KT*ktile) of the rows (ld apart) of a row-major
// [B, K] matrix: by the warps of the first n-group.
template <typename S>
RNNEXT_HD void stage_a(const Plan& pl, const S* src, int32_t ld, S* a, int tid) {
  const int warp = tid / 32;
  const int32_t k0 = warp * pl.KT * pl.ktile, k1 = k0 + pl.KT * pl.ktile < pl.K ? k0 + pl.KT * pl.ktile : pl.K;
  if (n_group(pl, warp) == 0 && k0 < k1) stage_rows(src, ld, a, pl.lda, pl.B, k0, k1 - k0, tid % 32, 32);
  copies_issued();
}

// ---- one layer-direction's forward on CTA k ----------------------------------------------------------

template <typename Cell, typename S, typename A>
struct ForwardRegs {
  using Shp = Shape<Dir::Forward>;
  uint32_t b[Shp::KT][Shp::NT][2];
  float acc[Shp::CH][Shp::NT][4];
  Elements<Shp::E> el;
  A state[Shp::E][Cell::Z];  // the carried states
};

template <typename Cell, typename S, typename A>
struct ForwardCTA {
  using Regs = ForwardRegs<Cell, S, A>;
  static constexpr int E = Shape<Dir::Forward>::E, G = Cell::G, Z = Cell::Z, K = Cell::SAVED, ZN = Cell::ZONED;
  const Plan& pl;
  const cells::SeqFwd<S, A>& p;
  int32_t k;            // this CTA
  unsigned char* smem;  // its shared memory
  const S* w_hh;        // [G*H, H]
  const S* h0;          // [B, H]: h before step 0 (read by every CTA at step 0)
  S *buf0, *buf1;       // [B, H] h after odd / even steps, read by every CTA at the next step
  S* h_n;               // [B, H]: the final h (may be h0: written after the last barrier)
  const Grid& grid;

  RNNEXT_HD S* a_tile() const { return reinterpret_cast<S*>(smem); }
  RNNEXT_HD float* partials() const { return reinterpret_cast<float*>(smem + pl.off_r); }
  // tiles [B][G][U] xg, [B][ZN][U] keep weights; out: [B][U] y, [B][K][U] saved, [Z-1][B][U] other states
  RNNEXT_HD S* xg_tile() const { return reinterpret_cast<S*>(smem + pl.off_x); }
  RNNEXT_HD S* keep_tile() const { return xg_tile() + pl.B * G * pl.units; }
  RNNEXT_HD S* out_tile() const { return keep_tile() + pl.B * ZN * pl.units; }
  RNNEXT_HD float* biases() const { return reinterpret_cast<float*>(out_tile() + pl.B * (1 + K + Z - 1) * pl.units); }
  RNNEXT_HD const S* h_before(int32_t t) const { return t == 0 ? h0 : t % 2 ? buf1 : buf0; }
  RNNEXT_HD S* h_after(int32_t t) const { return t % 2 ? buf0 : buf1; }
  RNNEXT_HD bool zoned() const { return ZN > 0 && (p.keep || p.keep_p > A(0)); }

  // Once: this thread's elements and their states; this warp's Bt fragments; the biases of the CTA's units
  // (b_ih, then b_hh: [2][G][U]); A's zero padding.
  RNNEXT_HD void prologue(Regs& r, int tid) const {
    const int32_t j0 = first_unit(pl, k), nu = units_of(pl, k), H = pl.H, U = pl.units;
    r.el.assign(pl, nu, p.lengths, p.T, tid);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (r.el.row[e] < 0) continue;
      const int32_t b = r.el.row[e], j = j0 + r.el.unit[e];
      r.state[e][0] = A(h0[b * H + j]);
#pragma unroll
      for (int z = 1; z < Z; ++z) r.state[e][z] = p.st[(z - 1) * pl.B * H + b * H + j];
    }
    for (int32_t i = tid; i < 2 * G * U; i += pl.threads) {
      const int32_t which = i / (G * U), g = i / U % G, u = i % U;
      const S* bias = which ? p.b_hh : p.b_ih;
      biases()[i] = bias && u < nu ? float(bias[g * H + j0 + u]) : 0.f;
    }
    // Bt row n = g * units + u is W_hh's row g * H + j0 + u (local: its columns from j0); zero outside the CTA's
    // units and K
    const int warp = tid / 32, lane = tid % 32, gr = lane / 4, q = lane % 4;
    const int32_t kg = k_group(pl, warp), ng = n_group(pl, warp);
#pragma unroll
    for (int kt = 0; kt < Shape<Dir::Forward>::KT; ++kt)
#pragma unroll
      for (int nt = 0; nt < Shape<Dir::Forward>::NT; ++nt) {
        const int32_t k0 = (kg * pl.KT + kt) * pl.ktile, n = (ng * pl.NT + nt) * 8 + gr, gate = n / U, u = n % U;
        const bool in = kt < pl.KT && nt < pl.NT && k0 < pl.K && gate < G && u < nu;
        const S* row = w_hh + (in ? (gate * H + j0 + u) * H + (pl.local ? j0 : 0) : 0);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int32_t c = sizeof(S) == 2 ? k0 + 2 * q + 8 * i : k0 + q + 4 * i;
          if constexpr (sizeof(S) == 2)
            r.b[kt][nt][i] = in ? pack2(c < pl.K ? row[c] : S(0.f), c + 1 < pl.K ? row[c + 1] : S(0.f)) : 0u;
          else
            r.b[kt][nt][i] = in && c < pl.K ? tf32(float(row[c])) : 0u;
        }
      }
    pad_a(pl, a_tile(), tid);
  }

  // Step t's input tiles (after the arrival of step t - 1, whose tiles are read then).
  RNNEXT_HD void prefetch(int32_t t, int tid) const {
    if (t >= p.T) return;
    const int32_t j0 = first_unit(pl, k), nu = units_of(pl, k), U = pl.units, H = pl.H, B = pl.B;
    stage_rows(p.xg + int64_t(cells::in_chunk(p, t)) * B * G * H + j0, H, xg_tile(), U, B * G, 0, nu, tid, pl.threads);
    if (ZN > 0 && p.keep)
      stage_rows(p.keep + int64_t(t) * B * ZN * H + j0, H, keep_tile(), U, B * ZN, 0, nu, tid, pl.threads);
    copies_issued();
  }

  // This warp's slice of A = h before step t (after the wait). Local: the CTA's columns of h0, at step 0 only
  // (then the cell writes them).
  RNNEXT_HD void stage(int32_t t, int tid) const {
    if (!pl.local)
      stage_a(pl, h_before(t), pl.H, a_tile(), tid);
    else if (t == 0)
      stage_a(pl, h0 + first_unit(pl, k), pl.H, a_tile(), tid);
  }

  template <int N>
  RNNEXT_HD void multiply(Regs* r, int tid) const {
    persistent::multiply<Dir::Forward, N>(pl, a_tile(), partials(), r, tid);
  }

  // The cell of this thread's elements: hg from the warps' partial sums, xg from its tile; h_t to the other
  // CTAs (local: into A), y, saved and the other states into the out tile.
  RNNEXT_HD void cell(Regs& r, int32_t t) const {
    const int32_t j0 = first_unit(pl, k), U = pl.units, B = pl.B, H = pl.H;
    const S *x = xg_tile(), *kt = keep_tile();
    const float* bias = biases();
    S *out = out_tile(), *h = h_after(t);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (r.el.row[e] < 0) continue;
      const int32_t b = r.el.row[e], u = r.el.unit[e];
      A xv[G], hp[G], next[Z], saved[at_least_one<K>], keep[at_least_one<ZN>];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        xv[g] = A(x[(b * G + g) * U + u]) + bias[g * U + u];
        hp[g] = A(warp_sum(pl, partials(), b, g * U + u)) + bias[(G + g) * U + u];
      }
#pragma unroll
      for (int z = 0; z < ZN; ++z) keep[z] = p.keep ? A(kt[(b * ZN + z) * U + u]) : p.keep_p;
      const bool on = t < r.el.len[e];
      const A y = cells::forward_unit<Cell>(on, zoned(), keep, xv, hp, r.state[e], next, saved);
#pragma unroll
      for (int z = 0; z < Z; ++z) r.state[e][z] = next[z];
      if (pl.local)
        a_tile()[b * pl.lda + u] = S(next[0]);
      else
        h[b * H + j0 + u] = S(next[0]);
      out[b * U + u] = S(y);
#pragma unroll
      for (int s = 0; s < K; ++s) out[(B + b * K + s) * U + u] = S(saved[s]);
#pragma unroll
      for (int z = 1; z < Z; ++z) out[(B * (1 + K) + (z - 1) * B + b) * U + u] = S(on ? next[z] : A(0));
    }
  }

  // After the arrival (and the block sync before it): the out tile to y, saved and the states' history,
  // which nobody reads during the sequence, in 16-byte pieces.
  RNNEXT_HD void store(int32_t t, int tid) const {
    const int32_t j0 = first_unit(pl, k), nu = units_of(pl, k), U = pl.units, B = pl.B, H = pl.H;
    const int64_t n = int64_t(B) * H;
    const S* out = out_tile();
    constexpr int32_t v = 16 / sizeof(S);
    auto put = [&](const S* tile, S* dst, int32_t rows) {  // [rows][U] -> rows of H at column j0
      for (int32_t i = tid; i < rows * (nu / v); i += pl.threads) {
        const int32_t row = i / (nu / v), c = i % (nu / v) * v;
        move16(dst + row * H + j0 + c, tile + row * U + c);
      }
    };
    put(out, p.y + t * n, B);
    if (p.saved) put(out + B * U, p.saved + t * K * n, B * K);
    if (p.st_all) put(out + B * (1 + K) * U, p.st_all + t * (Z - 1) * n, (Z - 1) * B);
  }

  // After the last step's barrier: the final states (h_n may be h0, which every CTA read at step 0).
  RNNEXT_HD void epilogue(const Regs& r) const {
    const int32_t j0 = first_unit(pl, k), H = pl.H;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (r.el.row[e] < 0) continue;
      const int32_t b = r.el.row[e], j = j0 + r.el.unit[e];
      h_n[b * H + j] = S(r.state[e][0]);
#pragma unroll
      for (int z = 1; z < Z; ++z) p.st[(z - 1) * pl.B * H + b * H + j] = r.state[e][z];
    }
  }

  // A CTA that gave up waiting: NaN in everything this CTA's units would have written, so that results
  // a timeout made wrong cannot pass for right ones.
  RNNEXT_HD void poison(int tid) const {
    const int32_t j0 = first_unit(pl, k), nu = units_of(pl, k), B = pl.B, H = pl.H;
    const S nan = S(NAN);
    for (int32_t i = tid; i < B * nu; i += pl.threads) {
      const int32_t b = i / nu, j = j0 + i % nu;
      for (int32_t t = 0; t < p.T; ++t) p.y[int64_t(t) * B * H + b * H + j] = nan;
      h_n[b * H + j] = nan;
      for (int z = 1; z < Z; ++z) p.st[(z - 1) * B * H + b * H + j] = A(NAN);
    }
  }
};

// ---- one layer-direction's backward on CTA k ---------------------------------------------------------

template <typename Cell, typename S, typename A>
struct BackwardRegs {
  using Shp = Shape<Dir::Backward>;
  uint32_t b[Shp::KT][Shp::NT][2];
  float acc[Shp::CH][Shp::NT][4];
  Elements<Shp::E> el;
  A grad[Shp::E][Cell::Z];  // the gradients of the states after the step (h's: the GEMM's, without dy)
  A direct[Shp::E];         // the part of h_prev's gradient that skips the GEMM
};

template <typename Cell, typename S, typename A>
struct BackwardCTA {
  using Regs = BackwardRegs<Cell, S, A>;
  static constexpr int E = Shape<Dir::Backward>::E, G = Cell::G, Z = Cell::Z, K = Cell::SAVED, ZN = Cell::ZONED;
  const Plan& pl;
  const cells::SeqBwd<S, A>& p;  // dxg, dhg [T, B, G*H] (rows G*H apart); dy [T, B, H]
  int32_t k;
  unsigned char* smem;
  const S* w_hh;  // [G*H, H]
  S* dh;          // [B, H]: dh_n on entry, dh_0 on exit (this CTA's units only: no other CTA reads them)
  const Grid& grid;

  RNNEXT_HD S* a_tile() const { return reinterpret_cast<S*>(smem); }
  RNNEXT_HD float* partials() const { return reinterpret_cast<float*>(smem + pl.off_r); }
  RNNEXT_HD S* tiles() const { return reinterpret_cast<S*>(smem + pl.off_x); }
  RNNEXT_HD bool zoned() const { return ZN > 0 && (p.keep || p.keep_p > A(0)); }

  RNNEXT_HD void prologue(Regs& r, int tid) const {
    const int32_t j0 = first_unit(pl, k), nu = units_of(pl, k), H = pl.H, B = pl.B;
    r.el.assign(pl, nu, p.lengths, p.T, tid);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (r.el.row[e] < 0) continue;
      const int32_t b = r.el.row[e], j = j0 + r.el.unit[e];
      r.grad[e][0] = A(dh[b * H + j]);
#pragma unroll
      for (int z = 1; z < Z; ++z) r.grad[e][z] = p.dst[(z - 1) * B * H + b * H + j];
    }
    // Bt row n (unit u = n) is W_hh's column j0 + u, over all G*H rows (local: column c of K is row g * H + j0 + v
    // of gate g = c / units and unit v = c % units)
    const int warp = tid / 32, lane = tid % 32, u = n_group(pl, warp) * 8 + lane / 4, q = lane % 4;
    const int32_t U = pl.units;
    auto w = [&](int32_t c) { return c < pl.K ? w_hh[(pl.local ? c / U * H + j0 + c % U : c) * H + j0 + u] : S(0.f); };
#pragma unroll
    for (int kt = 0; kt < Shape<Dir::Backward>::KT; ++kt) {
      const int32_t k0 = (k_group(pl, warp) * pl.KT + kt) * pl.ktile;
      const bool in = kt < pl.KT && k0 < pl.K && u < nu;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int32_t c = sizeof(S) == 2 ? k0 + 2 * q + 8 * i : k0 + q + 4 * i;
        if constexpr (sizeof(S) == 2)
          r.b[kt][0][i] = in ? pack2(w(c), w(c + 1)) : 0u;
        else
          r.b[kt][0][i] = in && c < pl.K ? tf32(float(w(c))) : 0u;
      }
    }
    pad_a(pl, a_tile(), tid);
  }

  // The input tiles of step t, one after the other: dy [B][U], saved [B][K][U], h_prev [B][U] (cells that read
  // it), the other states before the step [Z-1][B][U], the output [B][U] (cells that read it), the keep
  // weights [B][ZN][U].
  RNNEXT_HD void prefetch(int32_t t, int tid) const {
    if (t < 0) return;
    const int32_t j0 = first_unit(pl, k), nu = units_of(pl, k), U = pl.units, H = pl.H, B = pl.B;
    const int64_t n = int64_t(B) * H;
    S* x = tiles();
    auto put = [&](const S* src, int32_t rows) {  // rows of H -> [rows][U]
      stage_rows(src + j0, H, x, U, rows, 0, nu, tid, pl.threads);
      x += rows * U;
    };
    put(p.dy + cells::in_chunk(p, t) * n, B);
    put(p.saved + t * K * n, B * K);
    if (Cell::reads_h_prev) put(t ? p.y + (t - 1) * n : p.h0, B);
    if (Z > 1) put(t ? p.st_all + (t - 1) * (Z - 1) * n : p.s0, (Z - 1) * B);
    if (Cell::reads_out) put(p.y + t * n, B);
    if (ZN > 0 && p.keep) put(p.keep + t * ZN * n, B * ZN);
    copies_issued();
  }

  // The cell backward of this thread's elements: their columns of dhg[t] (and dxg[t]) for every CTA (local: for
  // the weight gradients, and into A).
  RNNEXT_HD void cell(Regs& r, int32_t t) const {
    const int32_t j0 = first_unit(pl, k), U = pl.units, B = pl.B, H = pl.H, ld = G * H;
    const S *dy = tiles(), *saved = dy + B * U, *h_prev = saved + B * K * U,
            *st_prev = h_prev + (Cell::reads_h_prev ? B * U : 0), *out = st_prev + (Z - 1) * B * U,
            *keep_t = out + (Cell::reads_out ? B * U : 0);
    S* dxg = p.dxg + int64_t(cells::in_chunk(p, t)) * B * ld;
    S* dhg = p.dhg + int64_t(cells::in_chunk(p, t)) * B * ld;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (r.el.row[e] < 0) continue;
      const int32_t b = r.el.row[e], u = r.el.unit[e], j = j0 + u;
      const bool on = t < r.el.len[e];
      A sv[at_least_one<K>], prev[Z], outs[Z], dnext[Z], dx[G], dhp[G], dprev[Z], keep[at_least_one<ZN>];
#pragma unroll
      for (int s = 0; s < K; ++s) sv[s] = A(saved[(b * K + s) * U + u]);
      prev[0] = Cell::reads_h_prev ? A(h_prev[b * U + u]) : A(0);
      outs[0] = Cell::reads_out ? A(out[b * U + u]) : A(0);
#pragma unroll
      for (int z = 1; z < Z; ++z) prev[z] = A(st_prev[((z - 1) * B + b) * U + u]);
      A dh = r.grad[e][0];
      if (on) {
        dh += A(dy[b * U + u]);
        if (p.clip > A(0)) dh = dh < -p.clip ? -p.clip : dh > p.clip ? p.clip : dh;
      }
      dnext[0] = dh;
#pragma unroll
      for (int z = 1; z < Z; ++z) dnext[z] = r.grad[e][z];
#pragma unroll
      for (int z = 0; z < ZN; ++z) keep[z] = p.keep ? A(keep_t[(b * ZN + z) * U + u]) : p.keep_p;
      cells::backward_unit<Cell>(on, zoned(), keep, sv, prev, outs, dnext, dx, dhp, dprev);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        dhg[b * ld + g * H + j] = S(dhp[g]);
        if (pl.local) a_tile()[b * pl.lda + g * U + u] = S(dhp[g]);
        if (Cell::separate_hg) dxg[b * ld + g * H + j] = S(dx[g]);
      }
      r.direct[e] = dprev[0];
#pragma unroll
      for (int z = 1; z < Z; ++z) r.grad[e][z] = dprev[z];
    }
  }

  // This warp's slice of A = dhg[t] (after the wait; local: the cell wrote A).
  RNNEXT_HD void stage(int32_t t, int tid) const {
    if (!pl.local) stage_a(pl, p.dhg + int64_t(cells::in_chunk(p, t)) * pl.B * pl.K, pl.K, a_tile(), tid);
  }

  template <int N>
  RNNEXT_HD void multiply(Regs* r, int tid) const {
    persistent::multiply<Dir::Backward, N>(pl, a_tile(), partials(), r, tid);
  }

  // dh of this thread's elements for the step before: direct + the sum of the warps' partials.
  RNNEXT_HD void gather(Regs& r) const {
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (r.el.row[e] >= 0) r.grad[e][0] = r.direct[e] + A(warp_sum(pl, partials(), r.el.row[e], r.el.unit[e]));
  }

  RNNEXT_HD void epilogue(const Regs& r) const {
    const int32_t j0 = first_unit(pl, k), H = pl.H;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (r.el.row[e] < 0) continue;
      const int32_t b = r.el.row[e], j = j0 + r.el.unit[e];
      dh[b * H + j] = S(r.grad[e][0]);
#pragma unroll
      for (int z = 1; z < Z; ++z) p.dst[(z - 1) * pl.B * H + b * H + j] = r.grad[e][z];
    }
  }

  // NaN in this CTA's columns of the gate gradients (every step: the weight gradients' GEMMs read them) and
  // in its units' state gradients.
  RNNEXT_HD void poison(int tid) const {
    const int32_t j0 = first_unit(pl, k), nu = units_of(pl, k), B = pl.B, H = pl.H;
    const S nan = S(NAN);
    for (int32_t i = tid; i < B * nu; i += pl.threads) {
      const int32_t b = i / nu, j = j0 + i % nu;
      for (int32_t t = 0; t < p.T; ++t)
        for (int32_t g = 0; g < G; ++g) {
          p.dhg[(int64_t(t) * B + b) * G * H + g * H + j] = nan;
          p.dxg[(int64_t(t) * B + b) * G * H + g * H + j] = nan;
        }
      dh[b * H + j] = nan;
      for (int z = 1; z < Z; ++z) p.dst[(z - 1) * B * H + b * H + j] = A(NAN);
    }
  }
};

}  // namespace persistent
}  // namespace rnnext
