// Elman RNN cell: h = act(xg + hg), act = tanh or relu.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

enum class Act { Tanh, Relu };

template <Act A, typename T>
RNNEXT_HD T rnn_forward(T pre) {
  if (A == Act::Tanh) return tanh_(pre);
  return pre < T(0) ? T(0) : pre;  // keeps NaN, as torch.relu does
}

// Gradient of the pre-activation from dh and the cell's output h.
template <Act A, typename T>
RNNEXT_HD T rnn_backward(T dh, T h) {
  if (A == Act::Tanh) return dh * dtanh(h);
  return h > T(0) ? dh : T(0);
}

}  // namespace cells
}  // namespace rnnext
