// Elman RNN: h = act(xg + hg), act = tanh or relu. State h; nothing saved (backward reads the output h);
// no zoneout.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

enum class Act { Tanh, Relu };

template <Act act>
struct RNN {
  static constexpr const char* name = act == Act::Tanh ? "rnn_tanh" : "rnn_relu";
  static constexpr int G = 1, Z = 1, SAVED = 0, ZONED = 0;
  static constexpr bool separate_hg = false, reads_h_prev = false, reads_out = true, rows = false, proj = false;

  template <typename V>
  static RNNEXT_HD void forward(const V* x, const V* hp, const V*, V* next, V*) {
    next[0] = act == Act::Tanh ? Lanes<V>::tanh(x[0] + hp[0]) : Lanes<V>::relu(x[0] + hp[0]);
  }

  // out [Z]: the step's new state, h.
  template <typename V>
  static RNNEXT_HD void backward(const V*, const V*, const V* out, const V* dnext, V* dx, V*, V* dprev) {
    dx[0] = act == Act::Tanh ? dnext[0] * dtanh(out[0]) : Lanes<V>::relu_grad(dnext[0], out[0]);
    dprev[0] = V(0);
  }
};

}  // namespace cells
}  // namespace rnnext
