// MinimalGRU, the lecture's GRU ("GATED RECURRENT UNIT"): an update gate and no reset gate. Gate rows
// (u, c) of the [B, 2H] projections:
//   u = s(p_u), c~ = tanh(p_c), h = u*c~ + (1-u)*h'
// State h; saved (u, c~); no zoneout.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

struct MinimalGRU {
  static constexpr const char* name = "minimal_gru";
  static constexpr int G = 2, Z = 1, SAVED = 2, ZONED = 0;
  static constexpr bool separate_hg = false, reads_h_prev = true, reads_out = false, rows = false, proj = false;

  template <typename V>
  static RNNEXT_HD void forward(const V* x, const V* hp, const V* prev, V* next, V* saved) {
    const V u = sigmoid(x[0] + hp[0]), cand = Lanes<V>::tanh(x[1] + hp[1]);
    next[0] = u * cand + (V(1) - u) * prev[0];
    saved[0] = u, saved[1] = cand;
  }

  template <typename V>
  static RNNEXT_HD void backward(const V* saved, const V* prev, const V*, const V* dnext, V* dx, V*, V* dprev) {
    const V u = saved[0], cand = saved[1], dh = dnext[0];
    dx[0] = dh * (cand - prev[0]) * dsigmoid(u);
    dx[1] = dh * u * dtanh(cand);
    dprev[0] = dh * (V(1) - u);
  }
};

}  // namespace cells
}  // namespace rnnext
