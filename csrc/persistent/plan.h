// Host-side planner of the persistent kernels: whether one layer-direction fits on chip and how its
// hidden units are split over CTAs (persistent/cta.h has the layout it plans). Plain C++, tested on
// CPU through torch.ops.rnnext.persistent_plan, and the one the CPU emulation runs.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>

#include "persistent/cta.h"

namespace rnnext {
namespace persistent {

// What the device offers one cooperative launch (one CTA per SM: each CTA holds a weight slice).
struct Capacity {
  int64_t sms;             // CTAs that can be resident at once
  int64_t smem_per_block;  // dynamic shared memory bytes one CTA may have
  int64_t arch;            // compute capability, 10 * major + minor: the mma instructions need sm_80
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }
inline int64_t align128(int64_t bytes) { return round_up(bytes, 128); }

// The layout of `units` per CTA (local: whole heads, wn n-groups of warps) and whether it fits: pl has the
// problem and the checks make_plan made.
inline Plan layout(Plan pl, int64_t units, bool local, int64_t wn, int64_t elem, const Capacity& cap) {
  const bool fwd = pl.dir == int32_t(Dir::Forward);
  const int64_t G = pl.G, B = pl.B, H = pl.H;
  pl.units = int32_t(units);
  pl.local = local;
  pl.wn = int32_t(wn);
  pl.kshift = int32_t(wn == 1 ? 3 : wn == 2 ? 2 : wn == 4 ? 1 : 0);  // wn in 1, 2, 4, 8
  pl.ctas = int32_t(ceil_div(H, units));
  pl.K = int32_t(fwd ? (local ? units : H) : G * (local ? units : H));
  pl.N = int32_t(fwd ? G * units : units);
  pl.NT = int32_t(ceil_div(ceil_div(pl.N, 8), wn));
  pl.KT = int32_t(ceil_div(ceil_div(pl.K, pl.ktile), kWarps / wn));
  pl.MT = int32_t(ceil_div(B, 16));
  pl.elems = int32_t(ceil_div(B * units, kThreads));
  const int64_t kt_max = fwd ? Shape<Dir::Forward>::KT : Shape<Dir::Backward>::KT,
                nt_max = fwd ? Shape<Dir::Forward>::NT : Shape<Dir::Backward>::NT,
                e_max = fwd ? Shape<Dir::Forward>::E : Shape<Dir::Backward>::E;
  // A's rows padded so that the lanes' fragment loads hit 32 different banks (a row stride of 4 mod 8 words)
  pl.lda = int32_t(round_up(pl.K, pl.ktile) + 16 / elem);
  pl.ldr = int32_t(wn) * pl.NT * 8 + 4;  // every n-group's columns: a k-group's slice
  const int64_t bytes_a = align128(int64_t(pl.MT) * 16 * pl.lda * elem),
                bytes_r = align128(kWarps / wn * pl.MT * 16 * pl.ldr * 4),
                bytes_x = align128(B * pl.parts * units * elem + (fwd ? 2 * G * units * 4 : 0));  // tiles, biases
  pl.off_r = int32_t(bytes_a);
  pl.off_x = int32_t(bytes_a + bytes_r);
  const int64_t smem = bytes_a + bytes_r + bytes_x;
  pl.smem = int32_t(std::min<int64_t>(smem, INT32_MAX));
  pl.fits = (local || pl.ctas <= cap.sms) && pl.KT <= kt_max && pl.NT <= nt_max && pl.elems <= e_max &&
            smem <= cap.smem_per_block;
  return pl;
}

// elem: bytes of the input type; mma: its tensor-core instruction; parts: the element tiles' values per
// (row, unit) and step (forward_parts / backward_parts of the cell); head: the units per head of a block-diagonal
// W_hh (0 or H: dense).
inline Plan make_plan(Dir dir, int64_t G, int64_t B, int64_t H, int64_t elem, Mma mma, int64_t parts,
                      const Capacity& cap, int64_t head = 0) {
  Plan pl{};
  const bool fwd = dir == Dir::Forward;
  pl.dir = int32_t(dir);
  pl.G = int32_t(G);
  pl.B = int32_t(B);
  pl.H = int32_t(H);
  pl.head = int32_t(head > 0 && head < H && H % head == 0 ? head : H);
  pl.mma = int32_t(mma);
  pl.threads = kThreads;
  pl.parts = int32_t(parts);
  pl.wn = 1;
  pl.kshift = 3;
  // Rows are copied in 16-byte pieces (H a multiple of 8 16-bit or 4 float values); B fills at most kMaxMT
  // m-tiles; the products need sm_80's mma.
  if (mma == Mma::None || cap.arch < 80 || B <= 0 || H <= 0 || B > 16 * kMaxMT || H % (16 / elem) || cap.sms <= 0 ||
      G * H >= (int64_t(1) << 24))
    return pl;
  pl.ktile = mma == Mma::Half ? 16 : 8;
  // Head-wise: CTAs of the fewest whole heads that are whole 16-byte pieces (the most CTAs: nothing waits for the
  // others), with the n-groups whose warps have the fewest MMAs each (ties: fewer partial sums per output)
  if (pl.head < H) {
    const int64_t units = std::lcm<int64_t>(pl.head, 16 / elem);  // divides H: head and 16 / elem do
    Plan best{};
    for (int64_t wn = 1; wn <= kWarps; wn *= 2) {
      const Plan c = layout(pl, units, true, wn, elem, cap);
      if (c.fits && (!best.fits || int64_t(c.NT) * c.KT <= int64_t(best.NT) * best.KT)) best = c;
    }
    if (best.fits) return best;
  }
  // Units per CTA, a multiple of 8 (16-byte pieces of a row, whole n-tiles backward): forward the most whose
  // G gate rows fill the register n-tiles (fewest CTAs: the grid barrier costs per CTA) and whose cell
  // elements the threads hold, backward 8 (one n-tile).
  const int64_t e_max = fwd ? Shape<Dir::Forward>::E : Shape<Dir::Backward>::E;
  int64_t units = std::min(fwd ? std::max<int64_t>(8, 8 * Shape<Dir::Forward>::NT / G / 8 * 8) : 8, round_up(H, 8));
  while (units > 8 && B * units > e_max * kThreads) units -= 8;
  return layout(pl, units, false, 1, elem, cap);
}

}  // namespace persistent
}  // namespace rnnext
