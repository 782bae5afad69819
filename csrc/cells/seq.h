// One layer-direction as raw pointers, and per cell the step functor (cells/step.h) of step t: what
// every time loop builds, whichever runs it (the per-step loop on CPU and CUDA, the persistent CUDA
// kernel, its CPU emulation). Shapes as driver/sequence.h; everything contiguous, row-major.
#pragma once
#include "cells/layernorm.h"
#include "cells/step.h"

namespace rnnext {
namespace cells {

template <typename S, typename A>
struct SeqFwd {
  int64_t T, B, H, P;
  int64_t t0;                 // the first step xg holds
  const int64_t* lengths;     // [B] or null
  const S *xg, *b_ih, *b_hh;  // xg [steps t0.., B, G*H]: the input projection x @ w_ih^T; biases [G*H], nullable
  A* st;                      // [Z-1, B, H] the carried states but h (LSTM: c), their initial values on entry
  S *y, *st_all, *saved;      // y [T, B, P]; st_all [T, Z-1, B, H] st after each step (0 past a sequence's end),
                              // saved [T, B, SAVED*H]: null when not saved
  S* r;                       // LSTM with projection: cell outputs [T, B, H] (y gets them projected); else null
  const S* keep;              // zoneout: keep weights [T, B, ZONED*H], or null
  A keep_p;                   // zoneout without a mask: the constant keep weight (eval); 0 = off
  // layer-normalised cells (cells/layernorm.h): the norms' weight and bias [N*H], epsilon; what backward
  // needs: the normalised values [T, B, N*H] and the reciprocal standard deviations [T, B, 2] (null: no
  // backward to follow)
  const S *ln_w, *ln_b;
  A eps;
  S* ln_norm;
  A* ln_rstd;
  A* ln_work;  // [B, 2H] (LSTM) scratch of the row functors
};

template <typename S, typename A>
struct SeqBwd {
  int64_t T, B, H, P;
  int64_t t0;  // the first step dy, dxg and dhg hold
  const int64_t* lengths;
  const S* dy;                          // [steps t0.., B, P] the gradient of y
  const S *y, *h0, *saved, *st_all, *s0;  // forward's (st_all, s0 [Z-1, B, H]: the other states' history, initial)
  A* dst;                               // [Z-1, B, H] the gradient of the other states, ds_n on entry
  S *dxg, *dhg;     // [steps t0.., B, G*H]: gradients of xg and of hg (the next GEMM's operand; == dxg but for the GRU)
  int64_t ldg;      // their row stride: G*H, or more (cells/step.h)
  S* direct;        // [B, P] the part of dh_prev not through hg; null where it is 0 (LSTM/RNN without lengths
                    // or zoneout)
  A clip;
  const S* keep;    // zoneout, as in SeqFwd
  A keep_p;
  const S *ln_w, *ln_b, *ln_norm;  // layer-normalised cells, as in SeqFwd
  const A* ln_rstd;
  A* ln_work;          // [B, N*H] scratch of the row functors
  A *ln_dw, *ln_db;    // [B, N*H] in/out: each row's sums over the steps of the norms' weight and bias gradients
};

// Step t's zoneout keep weights (Z parts per unit).
template <typename S, typename A, typename P>
RNNEXT_HD Keep<S, A> keep_of(const P& p, int64_t t, int64_t Z) {
  return {p.keep ? p.keep + t * Z * p.B * p.H : nullptr, p.keep_p, Z};
}

// xg, dy, dxg and dhg hold a chunk of steps from t0 (all of them where a kernel needs every step at once):
template <typename S, typename A>
RNNEXT_HD int64_t held(const SeqFwd<S, A>& p, int64_t t) {
  return t - p.t0;
}
template <typename S, typename A>
RNNEXT_HD int64_t held(const SeqBwd<S, A>& p, int64_t t) {
  return t - p.t0;
}

// The functors of step t, for every time loop. Forward: hg [B, G*H] this step's h_prev @ w_hh^T; h_prev,
// h [B, P] the state before and after (may alias). Backward: dh [B, H] the gradient of this step's h from
// the next step; proj: an LSTM with projection, whose dh is already through CarryBwd (dy, direct, clip
// are its business). Cells that need whole rows (rows: layer norm) build their own (Cell::fwd, Cell::bwd),
// run by the launcher's run_rows, per step, with no persistent kernel.
template <typename Cell, typename S, typename A>
RNNEXT_HD auto forward_step(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
  if constexpr (Cell::rows) {
    return Cell::fwd(p, t, hg, h_prev, h);
  } else {
    const int64_t n = p.B * p.H;
    return Forward<Cell, S, A>{
        .step = {p.lengths, t, p.H}, .xg = p.xg + held(p, t) * Cell::G * n, .hg = hg, .b_ih = p.b_ih,
        .b_hh = p.b_hh, .h_prev = p.r ? nullptr : h_prev, .st_prev = p.st, .h = p.r ? nullptr : h, .st = p.st,
        .st_out = p.st_all ? p.st_all + t * (Cell::Z - 1) * n : nullptr, .y = p.r ? p.r + t * n : p.y + t * p.B * p.P,
        .saved = p.saved ? p.saved + t * Cell::SAVED * n : nullptr, .keep = keep_of<S, A>(p, t, Cell::ZONED),
        .plane = n};
  }
}

template <typename Cell, typename S, typename A>
RNNEXT_HD auto backward_step(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool proj) {
  if constexpr (Cell::rows) {
    return Cell::bwd(p, t, dh, proj);
  } else {
    const int64_t n = p.B * p.H, m = p.B * p.P;
    return Backward<Cell, S, A>{
        .step = {p.lengths, t, p.H}, .dh_next = dh, .dy = proj ? nullptr : p.dy + held(p, t) * m,
        .saved = p.saved + t * Cell::SAVED * n, .h_prev = t ? p.y + (t - 1) * m : p.h0,
        .st_prev = t ? p.st_all + (t - 1) * (Cell::Z - 1) * n : p.s0, .out = p.y + t * m, .dst = p.dst,
        .dxg = p.dxg + held(p, t) * p.B * p.ldg, .dhg = p.dhg + held(p, t) * p.B * p.ldg,
        .direct = proj ? nullptr : p.direct, .clip = proj ? A(0) : p.clip, .keep = keep_of<S, A>(p, t, Cell::ZONED),
        .ldg = p.ldg, .plane = n};
  }
}

// Layer-normalised LSTM (N = 5 normalised values per unit: 4 gates, the cell) and GRU (N = 6).
struct LNLSTM {
  static constexpr int G = 4, Z = 2, SAVED = 0, ZONED = 2, N = 5;
  static constexpr bool separate_hg = false, rows = true;
  template <typename S, typename A>
  static RNNEXT_HD LNLSTMFwd<S, A> fwd(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .xg = p.xg + held(p, t) * 4 * n, .hg = hg, .b_ih = p.b_ih, .b_hh = p.b_hh,
            .w = p.ln_w, .b = p.ln_b, .eps = p.eps, .c_prev = p.st, .h_prev = h_prev, .c = p.st,
            .c_out = p.st_all ? p.st_all + t * n : nullptr, .h = h, .y = p.y + t * n,
            .norm = p.ln_norm ? p.ln_norm + t * N * n : nullptr, .rstd = p.ln_rstd ? p.ln_rstd + t * 2 * p.B : nullptr,
            .keep = keep_of<S, A>(p, t, 2), .work = p.ln_work};
  }
  template <typename S, typename A>
  static RNNEXT_HD LNLSTMBwd<S, A> bwd(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .dh_next = dh, .dy = p.dy + held(p, t) * n, .norm = p.ln_norm + t * N * n,
            .w = p.ln_w, .b = p.ln_b, .c_prev = t ? p.st_all + (t - 1) * n : p.s0, .rstd = p.ln_rstd + t * 2 * p.B,
            .dc = p.dst, .dgates = p.dxg + held(p, t) * p.B * p.ldg, .direct = p.direct, .clip = p.clip,
            .keep = keep_of<S, A>(p, t, 2), .work = p.ln_work, .dw = p.ln_dw, .db = p.ln_db, .ldg = p.ldg};
  }
};

struct LNGRU {
  static constexpr int G = 3, Z = 1, SAVED = 0, ZONED = 1, N = 6;
  static constexpr bool separate_hg = true, rows = true;
  template <typename S, typename A>
  static RNNEXT_HD LNGRUFwd<S, A> fwd(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .xg = p.xg + held(p, t) * 3 * n, .hg = hg, .b_ih = p.b_ih, .b_hh = p.b_hh,
            .w = p.ln_w, .b = p.ln_b, .eps = p.eps, .h_prev = h_prev, .h = h, .y = p.y + t * n,
            .norm = p.ln_norm ? p.ln_norm + t * N * n : nullptr, .rstd = p.ln_rstd ? p.ln_rstd + t * 2 * p.B : nullptr,
            .keep = keep_of<S, A>(p, t, 1)};
  }
  template <typename S, typename A>
  static RNNEXT_HD LNGRUBwd<S, A> bwd(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .dh_next = dh, .dy = p.dy + held(p, t) * n, .norm = p.ln_norm + t * N * n,
            .w = p.ln_w, .b = p.ln_b, .h_prev = t ? p.y + (t - 1) * n : p.h0, .rstd = p.ln_rstd + t * 2 * p.B,
            .dxg = p.dxg + held(p, t) * p.B * p.ldg, .dhg = p.dhg + held(p, t) * p.B * p.ldg, .direct = p.direct,
            .clip = p.clip, .keep = keep_of<S, A>(p, t, 1), .work = p.ln_work, .dw = p.ln_dw, .db = p.ln_db,
            .ldg = p.ldg};
  }
};

}  // namespace cells
}  // namespace rnnext
