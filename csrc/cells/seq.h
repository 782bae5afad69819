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
  A* c;                       // LSTM: the carried cell state [B, H], c0 on entry; else null
  S *y, *c_all, *saved;       // y [T, B, P]; c_all [T, B, H] (LSTM), saved [T, B, S*H]: null when not saved
  S* r;                       // LSTM with projection: cell outputs [T, B, H] (y gets them projected); else null
  const S* keep;              // zoneout: keep weights [T, B, Z*H] (Z = 2 LSTM, 1 GRU), or null
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
  const S* dy;                                // [steps t0.., B, P] the gradient of y
  const S *y, *h0, *saved, *c_all, *c0;       // forward's (c_all, c0: LSTM)
  A* dc;                                      // LSTM: gradient of the cell state [B, H], dcn on entry
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

// Forward functor of step t: hg [B, G*H] this step's h_prev @ w_hh^T; h_prev, h [B, P] the state
// before and after (may alias). Backward functor of step t: dh [B, H] the gradient of this step's
// state from the next step; proj: an LSTM with projection, whose dh is already through CarryBwd.
// rows: the cell needs whole rows (layer norm): the launcher's run_rows, per step, no persistent kernel.
struct LSTM {
  static constexpr int G = 4, SAVED = 4;
  static constexpr bool separate_dhg = false, rows = false;
  template <typename S, typename A>
  static RNNEXT_HD LSTMFwd<S, A, A> fwd(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .xg = p.xg + held(p, t) * 4 * n, .hg = hg, .b_ih = p.b_ih, .b_hh = p.b_hh,
            .c_prev = p.c, .h_prev = p.r ? nullptr : h_prev, .c = p.c, .c_out = p.c_all ? p.c_all + t * n : nullptr,
            .h = p.r ? nullptr : h, .y = p.r ? p.r + t * n : p.y + t * p.B * p.P,
            .saved = p.saved ? p.saved + t * 4 * n : nullptr, .keep = keep_of<S, A>(p, t, 2)};
  }
  template <typename S, typename A>
  static RNNEXT_HD LSTMBwd<S, A, A> bwd(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool proj) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .dh_next = dh, .dy = proj ? nullptr : p.dy + held(p, t) * p.B * p.P,
            .saved = p.saved + t * 4 * n, .c_prev = t ? p.c_all + (t - 1) * n : p.c0, .c = p.c_all + t * n,
            .dc = p.dc, .dgates = p.dxg + held(p, t) * p.B * p.ldg, .direct = proj ? nullptr : p.direct,
            .clip = proj ? A(0) : p.clip, .keep = keep_of<S, A>(p, t, 2), .ldg = p.ldg};
  }
};

// The GRU (Fwd = GRUFwd, 3 gates, saves 4) and the lecture's GRU (MGRUFwd, 2 gates, saves 2).
template <template <typename, typename> class Fwd, int G_, int SAVED_>
struct Gated {
  static constexpr int G = G_, SAVED = SAVED_;
  static constexpr bool separate_dhg = G_ == 3;  // the GRU's b_hn sits inside r*(.): hg has its own gradient
  static constexpr bool rows = false;
  template <typename S, typename A>
  static RNNEXT_HD Fwd<S, A> fwd(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
    const int64_t n = p.B * p.H;
    Fwd<S, A> f{.step = {p.lengths, t, p.H}, .xg = p.xg + held(p, t) * G * n, .hg = hg, .b_ih = p.b_ih,
                .b_hh = p.b_hh, .h_prev = h_prev, .h = h, .y = p.y + t * n,
                .saved = p.saved ? p.saved + t * SAVED * n : nullptr};
    if constexpr (separate_dhg) f.keep = keep_of<S, A>(p, t, 1);  // zoneout: the GRU's (not the lecture's)
    return f;
  }
  template <typename S, typename A>
  static RNNEXT_HD auto bwd(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool) {
    const int64_t n = p.B * p.H;
    const Step step{p.lengths, t, p.H};
    const S *dy = p.dy + held(p, t) * n, *saved = p.saved + t * SAVED * n, *h_prev = t ? p.y + (t - 1) * n : p.h0;
    if constexpr (separate_dhg)
      return GRUBwd<S, A>{.step = step, .dh_next = dh, .dy = dy, .saved = saved, .h_prev = h_prev,
                          .dxg = p.dxg + held(p, t) * p.B * p.ldg, .dhg = p.dhg + held(p, t) * p.B * p.ldg,
                          .direct = p.direct, .clip = p.clip, .keep = keep_of<S, A>(p, t, 1), .ldg = p.ldg};
    else
      return MGRUBwd<S, A>{.step = step, .dh_next = dh, .dy = dy, .saved = saved, .h_prev = h_prev,
                           .dgates = p.dxg + held(p, t) * p.B * p.ldg, .direct = p.direct, .clip = p.clip,
                           .ldg = p.ldg};
  }
};
using GRU = Gated<GRUFwd, 3, 4>;
using MGRU = Gated<MGRUFwd, 2, 2>;

template <Act Act_>
struct RNN {
  static constexpr int G = 1, SAVED = 0;
  static constexpr bool separate_dhg = false, rows = false;
  template <typename S, typename A>
  static RNNEXT_HD RNNFwd<Act_, S, A> fwd(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .xg = p.xg + held(p, t) * n, .hg = hg, .b_ih = p.b_ih, .b_hh = p.b_hh,
            .h_prev = h_prev, .h = h, .y = p.y + t * n};
  }
  template <typename S, typename A>
  static RNNEXT_HD RNNBwd<Act_, S, A> bwd(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .dh_next = dh, .dy = p.dy + held(p, t) * n, .y = p.y + t * n,
            .dpre = p.dxg + held(p, t) * p.B * p.ldg, .direct = p.direct, .clip = p.clip, .ldg = p.ldg};
  }
};

// Layer-normalised LSTM (N = 5 normalised values per unit: 4 gates, the cell) and GRU (N = 6).
struct LNLSTM {
  static constexpr int G = 4, SAVED = 0, N = 5;
  static constexpr bool separate_dhg = false, rows = true;
  template <typename S, typename A>
  static RNNEXT_HD LNLSTMFwd<S, A> fwd(const SeqFwd<S, A>& p, int64_t t, const S* hg, const S* h_prev, S* h) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .xg = p.xg + held(p, t) * 4 * n, .hg = hg, .b_ih = p.b_ih, .b_hh = p.b_hh,
            .w = p.ln_w, .b = p.ln_b, .eps = p.eps, .c_prev = p.c, .h_prev = h_prev, .c = p.c,
            .c_out = p.c_all ? p.c_all + t * n : nullptr, .h = h, .y = p.y + t * n,
            .norm = p.ln_norm ? p.ln_norm + t * N * n : nullptr, .rstd = p.ln_rstd ? p.ln_rstd + t * 2 * p.B : nullptr,
            .keep = keep_of<S, A>(p, t, 2), .work = p.ln_work};
  }
  template <typename S, typename A>
  static RNNEXT_HD LNLSTMBwd<S, A> bwd(const SeqBwd<S, A>& p, int64_t t, const S* dh, bool) {
    const int64_t n = p.B * p.H;
    return {.step = {p.lengths, t, p.H}, .dh_next = dh, .dy = p.dy + held(p, t) * n, .norm = p.ln_norm + t * N * n,
            .w = p.ln_w, .b = p.ln_b, .c_prev = t ? p.c_all + (t - 1) * n : p.c0, .rstd = p.ln_rstd + t * 2 * p.B,
            .dc = p.dc, .dgates = p.dxg + held(p, t) * p.B * p.ldg, .direct = p.direct, .clip = p.clip,
            .keep = keep_of<S, A>(p, t, 2), .work = p.ln_work, .dw = p.ln_dw, .db = p.ln_db, .ldg = p.ldg};
  }
};

struct LNGRU {
  static constexpr int G = 3, SAVED = 0, N = 6;
  static constexpr bool separate_dhg = true, rows = true;
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
