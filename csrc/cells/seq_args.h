// One layer-direction as raw pointers, and per cell the step functor (cells/step.h, cells/rows.h) of step t:
// what every time loop builds, whichever runs it (the per-step loop on CPU and CUDA, the persistent CUDA
// kernel, its CPU emulation). Shapes as driver/sequence.h; everything contiguous, row-major.
#pragma once
#include "cells/all.h"
#include "cells/rows.h"
#include "cells/step.h"

namespace rnnext {
namespace cells {

template <typename S, typename A>
struct SeqFwd {
  int64_t T, B, H, P;
  int64_t t0;                  // the first step xg holds
  const int64_t* lengths;      // [B] or null
  const S *xg, *b_ih, *b_hh;   // xg [steps t0.., B, G*H]: the input projection x @ w_ih^T; biases [G*H], nullable
  A* st;                       // [Z-1, B, H] the carried states but h (LSTM: c), their initial values on entry
  S *y, *st_all, *saved;       // y [T, B, P]; st_all [T, Z-1, B, H] st after each step (0 past a sequence's end),
                               // saved [T, B, SAVED*H]: null when not saved
  A* stats;                    // [T, B, STATS] (row cells) null when not saved
  S* r;                        // LSTM with projection: cell outputs [T, B, H] (y gets them projected); else null
  const S* keep;               // zoneout: keep weights [T, B, ZONED*H], or null
  A keep_p;                    // zoneout without a mask: the constant keep weight (eval); 0 = off
  const S* param[kMaxParams];  // the cell's parameters [PARAM_UNITS*H] (row cells: layer norm's weight, bias)
  A eps;
  A* work;  // [B, WORK_FORWARD*H] the row cells' scratch
};

template <typename S, typename A>
struct SeqBwd {
  int64_t T, B, H, P;
  int64_t t0;  // the first step dy, dxg and dhg hold
  const int64_t* lengths;
  const S* dy;                            // [steps t0.., B, P] the gradient of y
  const S *y, *h0, *saved, *st_all, *s0;  // forward's (st_all, s0 [Z-1, B, H]: the other states' history, initial)
  const A* stats;
  A* dst;        // [Z-1, B, H] the gradient of the other states, ds_n on entry
  S *dxg, *dhg;  // [steps t0.., B, G*H]: gradients of xg and of hg (the next GEMM's operand; == dxg but for the GRU)
  int64_t ldg;   // their row stride: G*H, or more (cells/step.h)
  S* direct;     // [B, P] the part of dh_prev not through hg; null where it is 0 (LSTM/RNN without lengths
                 // or zoneout)
  A clip;
  const S* keep;  // zoneout, as in SeqFwd
  A keep_p;
  const S* param[kMaxParams];
  A* work;                // [B, WORK_BACKWARD*H]
  A* dparam[kMaxParams];  // [B, PARAM_UNITS*H] in/out: each row's sums over the steps of the parameters' gradients
};

// Step t's zoneout keep weights (Z parts per unit).
template <typename S, typename A, typename Args>
RNNEXT_HD Keep<S, A> keep_of(const Args& p, int64_t t, int64_t Z) {
  return {p.keep ? p.keep + t * Z * p.B * p.H : nullptr, p.keep_p, Z};
}

// Step t's index within the chunk of steps xg, dy, dxg and dhg hold, from t0 (all of them where a kernel needs
// every step at once).
template <typename S, typename A>
RNNEXT_HD int64_t in_chunk(const SeqFwd<S, A>& p, int64_t t) {
  return t - p.t0;
}
template <typename S, typename A>
RNNEXT_HD int64_t in_chunk(const SeqBwd<S, A>& p, int64_t t) {
  return t - p.t0;
}

// The functors of step t, for every time loop. Forward: hg [B, G*H] this step's h_prev @ w_hh^T; h_prev,
// h [B, P] the state before and after (may alias). Backward: dh [B, H] the gradient of this step's h from
// the next step; proj: an LSTM with projection, whose dh is already through CarryBwd (dy, direct, clip
// are its business). Row cells' functors are run by the launcher's run_rows, per step (no persistent
// kernel).
template <typename Cell, typename S, typename A>
RNNEXT_HD auto forward_step(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
  const int64_t n = p.B * p.H;
  const Step step{p.lengths, t, p.H};
  const S* xg = p.xg + in_chunk(p, t) * Cell::G * n;
  S* st_out = p.st_all ? p.st_all + t * (Cell::Z - 1) * n : nullptr;
  S* saved = p.saved ? p.saved + t * Cell::SAVED * n : nullptr;
  if constexpr (Cell::rows) {
    return RowForward<Cell, S, A>{.step = step,
                                  .xg = xg,
                                  .hg = hg,
                                  .b_ih = p.b_ih,
                                  .b_hh = p.b_hh,
                                  .h_prev = h_prev,
                                  .st_prev = p.st,
                                  .h = h,
                                  .st = p.st,
                                  .st_out = st_out,
                                  .y = p.y + t * n,
                                  .saved = saved,
                                  .stats = p.stats ? p.stats + t * Cell::STATS * p.B : nullptr,
                                  .param = {p.param[0], p.param[1]},
                                  .eps = p.eps,
                                  .keep = keep_of<S, A>(p, t, Cell::ZONED),
                                  .work = p.work,
                                  .plane = n};
  } else {
    return Forward<Cell, S, A>{.step = step,
                               .xg = xg,
                               .hg = hg,
                               .b_ih = p.b_ih,
                               .b_hh = p.b_hh,
                               .h_prev = p.r ? nullptr : h_prev,
                               .st_prev = p.st,
                               .h = p.r ? nullptr : h,
                               .st = p.st,
                               .st_out = st_out,
                               .y = p.r ? p.r + t * n : p.y + t * p.B * p.P,
                               .saved = saved,
                               .keep = keep_of<S, A>(p, t, Cell::ZONED),
                               .plane = n};
  }
}

template <typename Cell, typename S, typename A>
RNNEXT_HD auto backward_step(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool proj) {
  const int64_t n = p.B * p.H, m = p.B * p.P;
  const Step step{p.lengths, t, p.H};
  const S *saved = p.saved + t * Cell::SAVED * n, *h_prev = t ? p.y + (t - 1) * m : p.h0,
          *st_prev = t ? p.st_all + (t - 1) * (Cell::Z - 1) * n : p.s0;
  S *dxg = p.dxg + in_chunk(p, t) * p.B * p.ldg, *dhg = p.dhg + in_chunk(p, t) * p.B * p.ldg;
  if constexpr (Cell::rows) {
    return RowBackward<Cell, S, A>{.step = step,
                                   .dh_next = dh,
                                   .dy = p.dy + in_chunk(p, t) * n,
                                   .saved = saved,
                                   .h_prev = h_prev,
                                   .st_prev = st_prev,
                                   .stats = p.stats + t * Cell::STATS * p.B,
                                   .dst = p.dst,
                                   .dxg = dxg,
                                   .dhg = dhg,
                                   .direct = p.direct,
                                   .clip = p.clip,
                                   .keep = keep_of<S, A>(p, t, Cell::ZONED),
                                   .ldg = p.ldg,
                                   .plane = n,
                                   .param = {p.param[0], p.param[1]},
                                   .work = p.work,
                                   .dparam = {p.dparam[0], p.dparam[1]}};
  } else {
    return Backward<Cell, S, A>{.step = step,
                                .dh_next = dh,
                                .dy = proj ? nullptr : p.dy + in_chunk(p, t) * m,
                                .saved = saved,
                                .h_prev = h_prev,
                                .st_prev = st_prev,
                                .out = p.y + t * m,
                                .dst = p.dst,
                                .dxg = dxg,
                                .dhg = dhg,
                                .direct = proj ? nullptr : p.direct,
                                .clip = proj ? A(0) : p.clip,
                                .keep = keep_of<S, A>(p, t, Cell::ZONED),
                                .ldg = p.ldg,
                                .plane = n};
  }
}

}  // namespace cells
}  // namespace rnnext
