// sLSTM (xLSTM, Beck et al. 2024): exponential input and forget gates, stabilised by a carried max m.
// Gate rows (i, f, z, o) of the [B, 4H] projections (p = xg + hg, biases included):
//   lf = logsigmoid(p_f);  where n' = 0 (an empty state: the zero initial state) m = p_i and f = 0,
//   else m = max(p_i, lf + m') (ties to p_i), f = exp(lf + m' - m);  i = exp(p_i - m)
//   c = f*c' + i*tanh(p_z),  n = f*n' + i,  h = s(p_o)*c/n
// States (h, c, n, m); saved (i, f, z, o, s(-p_f), whether m = p_i); no zoneout. With the rule for empty
// states n >= 1 at every step (m = p_i gives i = 1, else f = 1 and n >= n'), so h never divides by 0
// (docs/design.md, "sLSTM").
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

struct SLSTM {
  static constexpr const char* name = "slstm";
  static constexpr int G = 4, Z = 4, SAVED = 6, ZONED = 0;
  static constexpr bool separate_hg = false, reads_h_prev = false, reads_out = false, rows = false, proj = false;

  template <typename V>
  static RNNEXT_HD void forward(const V* x, const V* hp, const V* prev, V* next, V* saved) {
    using L = Lanes<V>;
    const V pi = x[0] + hp[0], pf = x[1] + hp[1], z = L::tanh(x[2] + hp[2]), o = sigmoid(x[3] + hp[3]);
    const auto empty = L::eq(prev[2], V(0));
    const V a = logsigmoid(pf) + prev[3];
    const auto at_i = L::either(empty, L::ge(pi, a));  // an empty state's stabiliser restarts at p_i
    const V m = L::pick(at_i, pi, a), i = L::exp(pi - m), f = L::pick(empty, V(0), L::exp(a - m));
    next[1] = f * prev[1] + i * z;
    next[2] = f * prev[2] + i;
    next[3] = m;
    next[0] = o * next[1] / next[2];
    saved[0] = i, saved[1] = f, saved[2] = z, saved[3] = o, saved[4] = sigmoid(V(0) - pf);
    saved[5] = L::pick(at_i, V(1), V(0));
  }

  // Every state's gradient, m's included (it is differentiable: the gradient of a loss on h alone through
  // m sums to 0, but not one on c, n or m).
  template <typename V>
  static RNNEXT_HD void backward(const V* saved, const V* prev, const V*, const V* dnext, V* dx, V*, V* dprev) {
    const V i = saved[0], f = saved[1], z = saved[2], o = saved[3], sf = saved[4], at_i = saved[5];
    const V c = f * prev[1] + i * z, n = f * prev[2] + i, dh = dnext[0];
    const V dc = dnext[1] + dh * o / n, dn = dnext[2] - dh * o * c / (n * n);
    const V di = (dc * z + dn) * i, df = (dc * prev[1] + dn * prev[2]) * f;  // through i = e^(.), f = e^(.)
    const V dm = dnext[3] - di - df;                                         // m's share of both exponents
    const V da = df + (V(1) - at_i) * dm;                                    // a = lf + m'
    dx[0] = di + at_i * dm;
    dx[1] = da * sf;
    dx[2] = dc * i * dtanh(z);
    dx[3] = dh * c / n * dsigmoid(o);
    dprev[0] = V(0);
    dprev[1] = dc * f;
    dprev[2] = dn * f;
    dprev[3] = da;
  }
};

}  // namespace cells
}  // namespace rnnext
