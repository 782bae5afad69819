// Host-side planner of the persistent kernels: whether one layer-direction fits on chip and how its
// hidden units are split over CTAs (persistent/cta.h has the layout it plans). Plain C++, tested on
// CPU through torch.ops.rnnext.persistent_plan.
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
  int64_t threads;         // per CTA
  int64_t min_rows;        // fewest rows of W_hh per CTA worth a CTA (fewer CTAs: cheaper grid barrier)
  bool align_units;        // round units per CTA so that a CTA's rows fill whole 16-row tiles
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }
inline int64_t align128(int64_t bytes) { return round_up(bytes, 128); }

// elem: bytes of the input type; acc: of its accumulation type; mma: 16x16x16 tensor-core tiles.
inline Plan make_plan(Dir dir, int64_t G, int64_t B, int64_t H, int64_t elem, int64_t acc, bool mma,
                      const Capacity& cap) {
  Plan pl{};
  const bool fwd = dir == Dir::Forward;
  pl.dir = int32_t(dir);
  pl.G = int32_t(G);
  pl.B = B;
  pl.H = H;
  pl.mma = mma;
  pl.threads = int32_t(cap.threads);
  if (B <= 0 || H <= 0 || cap.sms <= 0) return pl;
  // A unit is G rows of W_hh (forward) or one column of all G*H rows (backward): the same weights.
  // Its GEMM rows: G per unit forward, 1 backward; whole 16-row tiles when aligning.
  const int64_t rows_per_unit = fwd ? G : 1;
  const int64_t align = mma && cap.align_units ? 16 / std::gcd<int64_t>(rows_per_unit, 16) : 1;
  int64_t units = std::max(ceil_div(H, cap.sms), ceil_div(cap.min_rows, G));
  units = std::min(round_up(units, align), round_up(H, align));
  pl.units = units;
  pl.ctas = int32_t(ceil_div(H, units));
  pl.K = fwd ? H : G * H;
  pl.N = rows_per_unit * units;
  const int64_t tile = mma ? 16 : 1, pad = mma ? 8 : std::max<int64_t>(1, 4 / elem);
  pl.Bp = round_up(B, tile);
  pl.Np = round_up(pl.N, tile);
  pl.Kp = round_up(pl.K, tile);
  pl.ldb = pl.Kp + pad;
  pl.lds = pl.Np + (mma ? 4 : 1);
  const int64_t bytes_b = align128(pl.Np * pl.ldb * elem), bytes_s = align128(pl.Bp * pl.lds * acc);
  // A's chunk: all of K if it fits, else the most columns (whole tiles) that do.
  const int64_t room = cap.smem_per_block - bytes_b - bytes_s;
  int64_t kc = room > 0 ? std::min(pl.Kp, (room / (pl.Bp * elem) - pad) / tile * tile) : 0;
  while (kc > 0 && bytes_b + align128(pl.Bp * (kc + pad) * elem) + bytes_s > cap.smem_per_block) kc -= tile;
  pl.kc = std::max<int64_t>(kc, 0);
  pl.lda = pl.kc + pad;
  pl.off_a = bytes_b;
  pl.off_s = bytes_b + align128(pl.Bp * pl.lda * elem);
  pl.smem = pl.off_s + bytes_s;
  pl.fits = pl.ctas <= cap.sms && pl.kc >= std::min<int64_t>(pl.Kp, 16) && pl.smem <= cap.smem_per_block;
  return pl;
}

}  // namespace persistent
}  // namespace rnnext
