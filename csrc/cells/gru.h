// GRU, torch.nn layout: gate rows (r, z, n) of the [B, 3H] input part xg and hidden part hg.
//   r = s(xr + hr), z = s(xz + hz), n = tanh(xn + r*hn), h = (1-z)*n + z*h'
// hn (= W_hn h' + b_hn) sits inside r*(.), so the two projections stay apart and hg has its own gradient.
// State h; saved (r, z, n, hn); zoneout on h.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

struct GRU {
  static constexpr const char* name = "gru";
  static constexpr int G = 3, Z = 1, SAVED = 4, ZONED = 1;
  static constexpr bool separate_hg = true, reads_h_prev = true, reads_out = false, rows = false, proj = false;

  template <typename V>
  static RNNEXT_HD void forward(const V* x, const V* hp, const V* prev, V* next, V* saved) {
    const V r = sigmoid(x[0] + hp[0]), z = sigmoid(x[1] + hp[1]), n = Lanes<V>::tanh(x[2] + r * hp[2]);
    next[0] = (V(1) - z) * n + z * prev[0];
    saved[0] = r, saved[1] = z, saved[2] = n, saved[3] = hp[2];
  }

  // dx: the input projection's pre-activation gradients, dhp the hidden one's (r and z rows equal dx's).
  template <typename V>
  static RNNEXT_HD void backward(const V* saved, const V* prev, const V*, const V* dnext, V* dx, V* dhp, V* dprev) {
    const V r = saved[0], z = saved[1], n = saved[2], hn = saved[3], dh = dnext[0];
    dx[2] = dh * (V(1) - z) * dtanh(n);
    dx[0] = dhp[0] = dx[2] * hn * dsigmoid(r);
    dx[1] = dhp[1] = dh * (prev[0] - n) * dsigmoid(z);
    dhp[2] = dx[2] * r;
    dprev[0] = dh * z;
  }
};

}  // namespace cells
}  // namespace rnnext
