// One time step of each cell over a [B, H] grid: the body of every pointwise kernel, CPU and CUDA,
// for the single-step cell ops and for each step of the sequence driver alike.
//
// A launcher calls f.apply<V>(b, j) for every row b < B and column j < H, V being acc_t (one element)
// or a CPU vector (a segment of row b from j). Loads and stores are in scalar_t, the math in acc_t
// (float for half/bfloat16). Pointers point at this step's [B, .] slice, contiguous, row-major:
//   xg, hg, dxg, dhg, dgates   [B, G*H]  gate k of row b at b*G*H + k*H + j
//   states and their grads     [B, H]
//   saved                      [B, 4*H]  activated gates, per cell below
// b_ih, b_hh [G*H] (nullable): added to xg and hg here, so that the GEMMs are plain mm (addmm first
// copies the broadcast bias into its output, which costs more than the add).
// Variable lengths: a row with lengths[b] <= t is past its end: its state carries over unchanged,
// its gate gradients are 0 and the gradient reaching its new state passes to its old one ("direct").
// Backward reads the gradient of the new state as dh_next (from step t+1) + dh_ext (nullable: from
// outside, e.g. the output y[t]), and writes to `direct` the part of the gradient of the previous
// state that does not go through hg (nullable where that part is known to be 0).
#pragma once
#include "cells/gru.h"
#include "cells/lstm.h"
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

// Gate k of a [B, G*H] projection (xg or hg) in row b, column j, plus its bias.
template <typename V, typename S>
RNNEXT_HD V load_gate(const S* proj, const S* bias, int64_t G, int64_t H, int64_t b, int64_t j, int64_t k) {
  V v = Lanes<V>::load(proj + (b * G + k) * H + j);
  return bias ? v + Lanes<V>::load(bias + k * H + j) : v;
}

// saved = (i, f, g, o). With proj_size, h receives the cell output o*tanh(c) (unmasked; the driver
// projects and masks it) and h_prev is null.
template <typename scalar_t, typename acc_t>
struct LSTMFwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *c_prev, *h_prev;
  scalar_t *h, *c, *saved;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    using L = Lanes<V>;
    const int64_t s = b * H + j, g = 4 * b * H + j;
    if (!active(b)) {  // saved and (with proj_size) h are unused past the end; zeros keep outputs defined
      L::store(c + s, L::load(c_prev + s));
      L::store(h + s, h_prev ? L::load(h_prev + s) : V(0));
      for (int k = 0; k < 4; ++k) L::store(saved + g + k * H, V(0));
      return;
    }
    LSTMGates<V> a;
    V tanh_c;
    auto pre = [&](int k) { return load_gate<V>(xg, b_ih, 4, H, b, j, k) + load_gate<V>(hg, b_hh, 4, H, b, j, k); };
    V cn = lstm_forward(pre(0), pre(1), pre(2), pre(3), L::load(c_prev + s), a, tanh_c);
    L::store(c + s, cn);
    L::store(h + s, a.o * tanh_c);
    L::store(saved + g, a.i);
    L::store(saved + g + H, a.f);
    L::store(saved + g + 2 * H, a.g);
    L::store(saved + g + 3 * H, a.o);
  }
};

// dc: [B, H] in/out, the gradient of c on entry (plus dc_ext), of c_prev on exit.
template <typename scalar_t, typename acc_t>
struct LSTMBwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *dh_next, *dh_ext, *dc_ext, *saved, *c_prev, *c;
  scalar_t *dc, *dgates, *direct;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    using L = Lanes<V>;
    const int64_t s = b * H + j, g = 4 * b * H + j;
    V dh = load_sum<V>(dh_next, dh_ext, s), dcin = load_sum<V>(dc, dc_ext, s);
    if (!active(b)) {
      for (int k = 0; k < 4; ++k) L::store(dgates + g + k * H, V(0));
      L::store(dc + s, dcin);
      if (direct) L::store(direct + s, dh);
      return;
    }
    LSTMGates<V> a{L::load(saved + g), L::load(saved + g + H), L::load(saved + g + 2 * H),
                   L::load(saved + g + 3 * H)};
    LSTMGates<V> d;
    L::store(dc + s, lstm_backward(dh, dcin, a, L::load(c_prev + s), L::load(c + s), d));
    L::store(dgates + g, d.i);
    L::store(dgates + g + H, d.f);
    L::store(dgates + g + 2 * H, d.g);
    L::store(dgates + g + 3 * H, d.o);
    if (direct) L::store(direct + s, V(0));
  }
};

// saved = (r, z, n, hn)
template <typename scalar_t, typename acc_t>
struct GRUFwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *h_prev;
  scalar_t *h, *saved;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    using L = Lanes<V>;
    const int64_t s = b * H + j, x = 3 * b * H + j, g = 4 * b * H + j;
    if (!active(b)) {
      L::store(h + s, L::load(h_prev + s));
      for (int k = 0; k < 4; ++k) L::store(saved + g + k * H, V(0));
      return;
    }
    GRUGates<V> a;
    auto xk = [&](int k) { return load_gate<V>(xg, b_ih, 3, H, b, j, k); };
    auto hk = [&](int k) { return load_gate<V>(hg, b_hh, 3, H, b, j, k); };
    L::store(h + s, gru_forward(xk(0), xk(1), xk(2), hk(0), hk(1), hk(2), L::load(h_prev + s), a));
    L::store(saved + g, a.r);
    L::store(saved + g + H, a.z);
    L::store(saved + g + 2 * H, a.n);
    L::store(saved + g + 3 * H, a.hn);
  }
};

template <typename scalar_t, typename acc_t>
struct GRUBwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *dh_next, *dh_ext, *saved, *h_prev;
  scalar_t *dxg, *dhg, *direct;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    using L = Lanes<V>;
    const int64_t s = b * H + j, x = 3 * b * H + j, g = 4 * b * H + j;
    V dh = load_sum<V>(dh_next, dh_ext, s);
    if (!active(b)) {
      for (int k = 0; k < 3; ++k) {
        L::store(dxg + x + k * H, V(0));
        L::store(dhg + x + k * H, V(0));
      }
      L::store(direct + s, dh);
      return;
    }
    GRUGates<V> a{L::load(saved + g), L::load(saved + g + H), L::load(saved + g + 2 * H), L::load(saved + g + 3 * H)};
    V dxr, dxz, dxn, dhn;
    L::store(direct + s, gru_backward(dh, a, L::load(h_prev + s), dxr, dxz, dxn, dhn));
    L::store(dxg + x, dxr);
    L::store(dxg + x + H, dxz);
    L::store(dxg + x + 2 * H, dxn);
    L::store(dhg + x, dxr);
    L::store(dhg + x + H, dxz);
    L::store(dhg + x + 2 * H, dhn);
  }
};

// Nothing saved: backward uses the new state h itself.
template <Act A, typename scalar_t, typename acc_t>
struct RNNFwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *h_prev;
  scalar_t* h;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    L::store(h + s, active(b) ? rnn_forward<A>(load_gate<V>(xg, b_ih, 1, H, b, j, 0) +
                                               load_gate<V>(hg, b_hh, 1, H, b, j, 0))
                              : L::load(h_prev + s));
  }
};

template <Act A, typename scalar_t, typename acc_t>
struct RNNBwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *dh_next, *dh_ext, *h;
  scalar_t *dpre, *direct;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    V dh = load_sum<V>(dh_next, dh_ext, s);
    const bool on = active(b);
    L::store(dpre + s, on ? rnn_backward<A>(dh, L::load(h + s)) : V(0));
    if (direct) L::store(direct + s, on ? V(0) : dh);
  }
};

// LSTM proj_size, forward: the new state is the projected cell output hp, or h_prev past the end.
template <typename scalar_t, typename acc_t>
struct CarryFwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *hp, *h_prev;
  scalar_t* h;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t s = b * H + j;
    Lanes<V>::store(h + s, Lanes<V>::load((active(b) ? hp : h_prev) + s));
  }
};

// LSTM proj_size, backward: splits the gradient of the new (projected) state into the part that goes
// through the projection (dhp) and the part carried past the end (direct).
template <typename scalar_t, typename acc_t>
struct CarryBwd : Step {
  using scalar = scalar_t;
  using acc = acc_t;
  const scalar_t *dh_next, *dh_ext;
  scalar_t *dhp, *direct;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    V dh = load_sum<V>(dh_next, dh_ext, s);
    const bool on = active(b);
    L::store(dhp + s, on ? dh : V(0));
    if (direct) L::store(direct + s, on ? V(0) : dh);
  }
};

}  // namespace cells
}  // namespace rnnext
