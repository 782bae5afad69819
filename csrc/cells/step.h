// One time step of each cell over a [B, H] grid: the body of every pointwise kernel, CPU and CUDA,
// for the single-step cell ops and for each step of the sequence driver alike.
//
// A launcher calls f.apply<V>(b, j) for every row b < B and column j < H, V being acc_t (one element)
// or a CPU vector (a segment of row b from j). Loads and stores are in scalar_t, the math in acc_t
// (float for half/bfloat16). Pointers point at this step's [B, .] slice, contiguous, row-major:
//   xg, hg                     [B, G*H]  gate k of row b at b*G*H + k*H + j
//   dxg, dhg, dgates, dpre     [B, G*H]  the same with rows ldg >= G*H apart (the sequence driver's CPU
//                                        buffers pad rows of a multiple of 4 KB: driver/loops.h)
//   states and their grads     [B, H]
//   saved                      [B, 4*H]  activated gates, per cell below
// b_ih, b_hh [G*H] (nullable): added to xg and hg here, so that the GEMMs are plain mm (addmm first
// copies the broadcast bias into its output, which costs more than the add).
// saved and c_out may be null: a forward that no backward will follow (no_grad) skips those stores.
// State pointers may alias (h_prev == h, c_prev == c): each element is read before it is written, by
// the same thread. y is this step's output row (0 past a sequence's end); h, c the carried state.
// Variable lengths: a row with lengths[b] <= t is past its end: its state carries over unchanged,
// its output, gates and gate gradients are 0, and the gradient of its state passes through
// unchanged ("direct"). Backward reads the gradient of the new state as dh_next (from step t+1)
// plus, for rows within their length, dy (nullable: the gradient of the output y[t]), and writes to
// `direct` the part of the gradient of the previous state that does not go through hg (nullable
// where that part is known to be 0).
// Zoneout (Krueger et al. 2016; LSTM and GRU): each unit of the new state keeps its previous value with
// weight k, h = k*h_prev + (1-k)*h~ (LSTM: c too, with its own k; h~ = o*tanh(c~) uses c~ before
// zoneout): k from a mask [B, Z*H] (0/1 in training: part 0 for h, 1 for c) or a constant p (eval).
// BPTT clipping (clip > 0): at every step within a sequence, the gradient of the state that step
// produced (from its output and from the next step, the sum above) is clamped to [-clip, clip]
// before it enters the step's backward. LSTM: the hidden state h (after projection with proj_size);
// the cell state's gradient is not clipped. Past a sequence's end nothing is clipped.
#pragma once
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/mgru.h"
#include "cells/rnn.h"

namespace rnnext {
namespace cells {

struct Step {
  const int64_t* lengths;  // [B] or nullptr (every row active)
  int64_t t, H;
  RNNEXT_HD bool active(int64_t b) const { return lengths == nullptr || t < lengths[b]; }
};

template <typename V, typename S>
RNNEXT_HD V load_sum(const S* a, const S* b_or_null, int64_t i) {
  V v = Lanes<V>::load(a + i);
  return b_or_null ? v + Lanes<V>::load(b_or_null + i) : v;
}

// The gradient of a step's new state: from the next step, plus from the output, clipped.
template <typename V, typename S, typename A>
RNNEXT_HD V state_grad(const S* dh_next, const S* dy, int64_t i, A clip) {
  V v = load_sum<V>(dh_next, dy, i);
  return clip > A(0) ? Lanes<V>::clamp(v, V(-clip), V(clip)) : v;
}

// Gate k of a [B, G*H] projection (xg or hg) in row b, column j, plus its bias.
template <typename V, typename S>
RNNEXT_HD V load_gate(const S* proj, const S* bias, int64_t G, int64_t H, int64_t b, int64_t j, int64_t k) {
  V v = Lanes<V>::load(proj + (b * G + k) * H + j);
  return bias ? v + Lanes<V>::load(bias + k * H + j) : v;
}

// Pre-activation of gate k: both projections and both biases.
template <typename V, typename S>
RNNEXT_HD V preact(const S* xg, const S* b_ih, const S* hg, const S* b_hh, int64_t G, int64_t H, int64_t b, int64_t j,
                   int64_t k) {
  return load_gate<V>(xg, b_ih, G, H, b, j, k) + load_gate<V>(hg, b_hh, G, H, b, j, k);
}

// v... to gates 0, 1, ... of a [B, G*H] row, p at gate 0 of this row and column.
template <typename V, typename S, typename... Vs>
RNNEXT_HD void store_gates(S* p, int64_t H, Vs... v) {
  int64_t k = 0;
  (Lanes<V>::store(p + H * k++, v), ...);
}

// Zoneout's keep weights of one step (see above); off when mask is null and p is 0.
template <typename scalar_t, typename acc_t>
struct Keep {
  const scalar_t* mask;  // [B, Z*H] or null
  acc_t p;
  int64_t Z;
  RNNEXT_HD bool on() const { return mask != nullptr || p > acc_t(0); }
  template <typename V>
  RNNEXT_HD V at(int64_t b, int64_t j, int64_t H, int64_t part) const {
    return mask ? Lanes<V>::load(mask + (b * Z + part) * H + j) : V(p);
  }
};

// saved = (i, f, g, o). With proj_size, y receives the cell output o*tanh(c) before the projection
// and h is null (the driver projects, then CarryFwd updates the state). c_out (nullable): c per step.
// state_t: the type of the carried cell state (float for 16-bit inputs in the sequence driver).
template <typename scalar_t, typename acc_t, typename state_t = scalar_t>
struct LSTMFwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *xg, *hg, *b_ih, *b_hh;
  const state_t* c_prev;
  const scalar_t* h_prev;
  state_t* c;
  scalar_t *c_out, *h, *y, *saved;
  Keep<scalar_t, acc_t> keep;  // zoneout (not with proj_size)
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j, g = 4 * b * H + j;
    if (!step.active(b)) {
      L::store(c + s, L::load(c_prev + s));
      if (h) L::store(h + s, L::load(h_prev + s));
      if (c_out) L::store(c_out + s, V(0));
      L::store(y + s, V(0));
      if (saved) store_gates<V>(saved + g, H, V(0), V(0), V(0), V(0));
      return;
    }
    LSTMGates<V> a;
    V tanh_c;
    V cn = lstm_forward(preact<V>(xg, b_ih, hg, b_hh, 4, H, b, j, 0), preact<V>(xg, b_ih, hg, b_hh, 4, H, b, j, 1),
                        preact<V>(xg, b_ih, hg, b_hh, 4, H, b, j, 2), preact<V>(xg, b_ih, hg, b_hh, 4, H, b, j, 3),
                        L::load(c_prev + s), a, tanh_c);
    V hn = a.o * tanh_c;
    if (keep.on()) {
      const V kh = keep.template at<V>(b, j, H, 0), kc = keep.template at<V>(b, j, H, 1);
      cn = kc * L::load(c_prev + s) + (V(1) - kc) * cn;
      hn = kh * L::load(h_prev + s) + (V(1) - kh) * hn;
    }
    L::store(c + s, cn);
    if (c_out) L::store(c_out + s, cn);
    if (h) L::store(h + s, hn);
    L::store(y + s, hn);
    if (saved) store_gates<V>(saved + g, H, a.i, a.f, a.g, a.o);
  }
};

// dc: [B, H] in/out, the gradient of c on entry, of c_prev on exit. c: c after this step. With
// zoneout, direct (the share of dh_prev that skips the cell) must be given.
template <typename scalar_t, typename acc_t, typename state_t = scalar_t>
struct LSTMBwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy, *saved, *c_prev, *c;
  state_t* dc;
  scalar_t *dgates, *direct;
  acc_t clip;
  Keep<scalar_t, acc_t> keep;
  int64_t ldg;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j, g = 4 * b * H + j, d = b * ldg + j;
    if (!step.active(b)) {
      store_gates<V>(dgates + d, H, V(0), V(0), V(0), V(0));
      if (direct) L::store(direct + s, L::load(dh_next + s));
      return;
    }
    LSTMGates<V> a{L::load(saved + g), L::load(saved + g + H), L::load(saved + g + 2 * H),
                   L::load(saved + g + 3 * H)};
    LSTMGates<V> da;
    const V dh = state_grad<V>(dh_next, dy, s, clip), dcn = L::load(dc + s), cp = L::load(c_prev + s);
    if (!keep.on()) {
      L::store(dc + s, lstm_backward(dh, dcn, a, cp, L::load(c + s), da));
      if (direct) L::store(direct + s, V(0));
    } else {  // through c~ = f*c_prev + i*g (before zoneout) with (1-k) of the gradients; k straight back
      const V kh = keep.template at<V>(b, j, H, 0), kc = keep.template at<V>(b, j, H, 1);
      L::store(dc + s, lstm_backward((V(1) - kh) * dh, (V(1) - kc) * dcn, a, cp, a.f * cp + a.i * a.g, da) + kc * dcn);
      L::store(direct + s, kh * dh);
    }
    store_gates<V>(dgates + d, H, da.i, da.f, da.g, da.o);
  }
};

// saved = (r, z, n, hn)
template <typename scalar_t, typename acc_t>
struct GRUFwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *h_prev;
  scalar_t *h, *y, *saved;
  Keep<scalar_t, acc_t> keep;  // zoneout
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j, g = 4 * b * H + j;
    if (!step.active(b)) {
      if (h) L::store(h + s, L::load(h_prev + s));
      L::store(y + s, V(0));
      if (saved) store_gates<V>(saved + g, H, V(0), V(0), V(0), V(0));
      return;
    }
    GRUGates<V> a;
    V hn = gru_forward(load_gate<V>(xg, b_ih, 3, H, b, j, 0), load_gate<V>(xg, b_ih, 3, H, b, j, 1),
                       load_gate<V>(xg, b_ih, 3, H, b, j, 2), load_gate<V>(hg, b_hh, 3, H, b, j, 0),
                       load_gate<V>(hg, b_hh, 3, H, b, j, 1), load_gate<V>(hg, b_hh, 3, H, b, j, 2),
                       L::load(h_prev + s), a);
    if (keep.on()) {
      const V k = keep.template at<V>(b, j, H, 0);
      hn = k * L::load(h_prev + s) + (V(1) - k) * hn;
    }
    if (h) L::store(h + s, hn);
    L::store(y + s, hn);
    if (saved) store_gates<V>(saved + g, H, a.r, a.z, a.n, a.hn);
  }
};

template <typename scalar_t, typename acc_t>
struct GRUBwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy, *saved, *h_prev;
  scalar_t *dxg, *dhg, *direct;
  acc_t clip;
  Keep<scalar_t, acc_t> keep;  // zoneout
  int64_t ldg;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j, x = b * ldg + j, g = 4 * b * H + j;
    if (!step.active(b)) {
      store_gates<V>(dxg + x, H, V(0), V(0), V(0));
      store_gates<V>(dhg + x, H, V(0), V(0), V(0));
      L::store(direct + s, L::load(dh_next + s));
      return;
    }
    GRUGates<V> a{L::load(saved + g), L::load(saved + g + H), L::load(saved + g + 2 * H), L::load(saved + g + 3 * H)};
    V dxr, dxz, dxn, dhn;
    const V dh = state_grad<V>(dh_next, dy, s, clip);
    if (!keep.on()) {
      L::store(direct + s, gru_backward(dh, a, L::load(h_prev + s), dxr, dxz, dxn, dhn));
    } else {  // (1-k) of the gradient through the cell, k straight back
      const V k = keep.template at<V>(b, j, H, 0);
      L::store(direct + s, gru_backward((V(1) - k) * dh, a, L::load(h_prev + s), dxr, dxz, dxn, dhn) + k * dh);
    }
    store_gates<V>(dxg + x, H, dxr, dxz, dxn);
    store_gates<V>(dhg + x, H, dxr, dxz, dhn);
  }
};

// Nothing saved: backward uses the output y itself.
template <Act A, typename scalar_t, typename acc_t>
struct RNNFwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *h_prev;
  scalar_t *h, *y;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    if (!step.active(b)) {
      if (h) L::store(h + s, L::load(h_prev + s));
      L::store(y + s, V(0));
      return;
    }
    V hn = rnn_forward<A>(preact<V>(xg, b_ih, hg, b_hh, 1, H, b, j, 0));
    if (h) L::store(h + s, hn);
    L::store(y + s, hn);
  }
};

// y: the forward output of this step.
template <Act A, typename scalar_t, typename acc_t>
struct RNNBwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy, *y;
  scalar_t *dpre, *direct;
  acc_t clip;
  int64_t ldg;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    const bool on = step.active(b);
    L::store(dpre + b * ldg + j, on ? rnn_backward<A>(state_grad<V>(dh_next, dy, s, clip), L::load(y + s)) : V(0));
    if (direct) L::store(direct + s, on ? V(0) : L::load(dh_next + s));
  }
};

// saved = (u, c~)
template <typename scalar_t, typename acc_t>
struct MGRUFwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *h_prev;
  scalar_t *h, *y, *saved;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j, g = 2 * b * H + j;
    if (!step.active(b)) {
      if (h) L::store(h + s, L::load(h_prev + s));
      L::store(y + s, V(0));
      if (saved) store_gates<V>(saved + g, H, V(0), V(0));
      return;
    }
    V u, cand;
    V hn = mgru_forward(preact<V>(xg, b_ih, hg, b_hh, 2, H, b, j, 0), preact<V>(xg, b_ih, hg, b_hh, 2, H, b, j, 1),
                        L::load(h_prev + s), u, cand);
    if (h) L::store(h + s, hn);
    L::store(y + s, hn);
    if (saved) store_gates<V>(saved + g, H, u, cand);
  }
};

template <typename scalar_t, typename acc_t>
struct MGRUBwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy, *saved, *h_prev;
  scalar_t *dgates, *direct;
  acc_t clip;
  int64_t ldg;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j, g = 2 * b * H + j, d = b * ldg + j;
    if (!step.active(b)) {
      store_gates<V>(dgates + d, H, V(0), V(0));
      L::store(direct + s, L::load(dh_next + s));
      return;
    }
    V dpu, dpc;
    L::store(direct + s, mgru_backward(state_grad<V>(dh_next, dy, s, clip), L::load(saved + g),
                                       L::load(saved + g + H), L::load(h_prev + s), dpu, dpc));
    store_gates<V>(dgates + d, H, dpu, dpc);
  }
};

// LSTM proj_size, forward: the projected cell output hp becomes the state and the output; past a
// sequence's end the state stays and the output is 0.
template <typename scalar_t, typename acc_t>
struct CarryFwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t* hp;
  scalar_t *h, *y;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    if (!step.active(b)) {
      L::store(y + s, V(0));
      return;
    }
    V v = L::load(hp + s);
    L::store(h + s, v);
    L::store(y + s, v);
  }
};

// LSTM proj_size, backward: the gradient of the projected output (dhp) and the part carried past a
// sequence's end (direct).
template <typename scalar_t, typename acc_t>
struct CarryBwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy;
  scalar_t *dhp, *direct;
  acc_t clip;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    const bool on = step.active(b);
    L::store(dhp + s, on ? state_grad<V>(dh_next, dy, s, clip) : V(0));
    if (direct) L::store(direct + s, on ? V(0) : L::load(dh_next + s));
  }
};

}  // namespace cells
}  // namespace rnnext
