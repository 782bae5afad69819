// The lecture's GRU ("GATED RECURRENT UNIT", rnnext.MinimalGRU): an update gate and no reset gate.
// Gate rows (u, c) of a [B, 2H] pre-activation (xg + hg + biases):
//   u = s(pu), c~ = tanh(pc), h = u*c~ + (1-u)*h'
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

template <typename T>
RNNEXT_HD T mgru_forward(T pu, T pc, T h_prev, T& u, T& cand) {
  u = sigmoid(pu);
  cand = Lanes<T>::tanh(pc);
  return u * cand + (T(1) - u) * h_prev;
}

// Gradients of the pre-activations from dh; returns the direct gradient of h_prev.
template <typename T>
RNNEXT_HD T mgru_backward(T dh, T u, T cand, T h_prev, T& dpu, T& dpc) {
  dpu = dh * (cand - h_prev) * dsigmoid(u);
  dpc = dh * u * dtanh(cand);
  return dh * (T(1) - u);
}

}  // namespace cells
}  // namespace rnnext
