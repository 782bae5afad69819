// Elman RNN cell: h = act(xg + hg), act = tanh or relu.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

enum class Act { Tanh, Relu };

template <Act A, typename T>
RNNEXT_HD T rnn_forward(T pre) {
  if (A == Act::Tanh) return Lanes<T>::tanh(pre);
  return Lanes<T>::relu(pre);
}

// Gradient of the pre-activation from dh and the cell's output h.
template <Act A, typename T>
RNNEXT_HD T rnn_backward(T dh, T h) {
  if (A == Act::Tanh) return dh * dtanh(h);
  return Lanes<T>::relu_grad(dh, h);
}

}  // namespace cells
}  // namespace rnnext
