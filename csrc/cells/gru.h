// GRU cell, torch.nn layout: gate rows (r, z, n) of [B, 3H] input part xg and hidden part hg.
//   r = s(xr + hr), z = s(xz + hz), n = tanh(xn + r*hn), h = (1-z)*n + z*h'
// hn (= W_hn h' + b_hn) sits inside r*(.), so xg and hg cannot be summed before the cell.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

template <typename T>
struct GRUGates {
  T r, z, n, hn;  // activated r, z, n and the hidden part of n's pre-activation
};

template <typename T>
RNNEXT_HD T gru_forward(T xr, T xz, T xn, T hr, T hz, T hn, T h_prev, GRUGates<T>& a) {
  a.r = sigmoid(xr + hr);
  a.z = sigmoid(xz + hz);
  a.hn = hn;
  a.n = Lanes<T>::tanh(xn + a.r * hn);
  return (T(1) - a.z) * a.n + a.z * h_prev;
}

// Gradients of the pre-activations: dx* for xg, dhn for hg's n row (hg's r and z rows equal
// dxr, dxz). Returns the direct gradient of h_prev (the path through hg is the caller's GEMM).
template <typename T>
RNNEXT_HD T gru_backward(T dh, const GRUGates<T>& a, T h_prev, T& dxr, T& dxz, T& dxn, T& dhn) {
  dxn = dh * (T(1) - a.z) * dtanh(a.n);
  dhn = dxn * a.r;
  dxr = dxn * a.hn * dsigmoid(a.r);
  dxz = dh * (h_prev - a.n) * dsigmoid(a.z);
  return dh * a.z;
}

}  // namespace cells
}  // namespace rnnext
