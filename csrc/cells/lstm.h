// LSTM cell, torch.nn layout: gate rows (i, f, g, o) of a [B, 4H] pre-activation.
//   c = f*c' + i*g,  h = o*tanh(c)
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

template <typename T>
struct LSTMGates {
  T i, f, g, o;
};

// Pre-activations pi..po -> activated gates; returns c, writes tanh(c).
template <typename T>
RNNEXT_HD T lstm_forward(T pi, T pf, T pg, T po, T c_prev, LSTMGates<T>& a, T& tanh_c) {
  a.i = sigmoid(pi);
  a.f = sigmoid(pf);
  a.g = Lanes<T>::tanh(pg);
  a.o = sigmoid(po);
  T c = a.f * c_prev + a.i * a.g;
  tanh_c = Lanes<T>::tanh(c);
  return c;
}

// dh, dc: gradients of h and c (dc from the next step or the caller). Writes the gradients of the
// pre-activations into d, returns the gradient of c_prev.
template <typename T>
RNNEXT_HD T lstm_backward(T dh, T dc, const LSTMGates<T>& a, T c_prev, T c, LSTMGates<T>& d) {
  T tanh_c = Lanes<T>::tanh(c);
  T dct = dc + dh * a.o * dtanh(tanh_c);
  d.i = dct * a.g * dsigmoid(a.i);
  d.f = dct * c_prev * dsigmoid(a.f);
  d.g = dct * a.i * dtanh(a.g);
  d.o = dh * tanh_c * dsigmoid(a.o);
  return dct * a.f;
}

}  // namespace cells
}  // namespace rnnext
