// LSTM, torch.nn layout: gate rows (i, f, g, o) of the [B, 4H] projections.
//   i, f, g, o = s(p_i), s(p_f), tanh(p_g), s(p_o)   (p = xg + hg, biases included)
//   c = f*c' + i*g,  h = o*tanh(c)
// States (h, c); saved (i, f, g, o); zoneout on h and c.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

// The LSTM's math in halves, so that the layer-normalised LSTM (cells/layernorm.h) normalises between them.
template <typename V>
struct LSTMGates {
  V i, f, g, o;
};

template <typename V>
RNNEXT_HD LSTMGates<V> lstm_gates(V pi, V pf, V pg, V po) {
  return {sigmoid(pi), sigmoid(pf), Lanes<V>::tanh(pg), sigmoid(po)};
}

// c~ = f*c' + i*g
template <typename V>
RNNEXT_HD V lstm_state(const LSTMGates<V>& a, V c_prev) {
  return a.f * c_prev + a.i * a.g;
}

// Backward through c~ = f*c' + i*g, from its gradient dct: the gradients of the pre-activations of i, f, g
// (d.o untouched); returns the gradient of c'.
template <typename V>
RNNEXT_HD V lstm_state_backward(V dct, const LSTMGates<V>& a, V c_prev, LSTMGates<V>& d) {
  d.i = dct * a.g * dsigmoid(a.i);
  d.f = dct * c_prev * dsigmoid(a.f);
  d.g = dct * a.i * dtanh(a.g);
  return dct * a.f;
}

struct LSTM {
  static constexpr const char* name = "lstm";
  static constexpr int G = 4, Z = 2, SAVED = 4, ZONED = 2;
  static constexpr bool separate_hg = false, reads_h_prev = false, reads_out = false, rows = false, proj = true;

  // x, hp [G]: the input and hidden projections' pre-activations (biases included); prev, next [Z] (h, c).
  template <typename V>
  static RNNEXT_HD void forward(const V* x, const V* hp, const V* prev, V* next, V* saved) {
    const auto a = lstm_gates(x[0] + hp[0], x[1] + hp[1], x[2] + hp[2], x[3] + hp[3]);
    next[1] = lstm_state(a, prev[1]);
    next[0] = a.o * Lanes<V>::tanh(next[1]);
    saved[0] = a.i, saved[1] = a.f, saved[2] = a.g, saved[3] = a.o;
  }

  // dnext [Z]: the gradients of next; dx [G] of the pre-activations (the hidden projection's are the same);
  // dprev [Z]: of prev, but for what goes through the hidden projection.
  template <typename V>
  static RNNEXT_HD void backward(const V* saved, const V* prev, const V*, const V* dnext, V* dx, V*, V* dprev) {
    const LSTMGates<V> a{saved[0], saved[1], saved[2], saved[3]};
    const V tanh_c = Lanes<V>::tanh(lstm_state(a, prev[1]));
    LSTMGates<V> d;
    d.o = dnext[0] * tanh_c * dsigmoid(a.o);
    dprev[1] = lstm_state_backward(dnext[1] + dnext[0] * a.o * dtanh(tanh_c), a, prev[1], d);
    dprev[0] = V(0);
    dx[0] = d.i, dx[1] = d.f, dx[2] = d.g, dx[3] = d.o;
  }
};

}  // namespace cells
}  // namespace rnnext
