// LayerNormGRU (Haste's LayerNormGRU with bias=False; biases, when given, inside the norms): the input and
// hidden projections normalised separately, then the GRU (cells/gru.h) on them:
//   u = LN_x(W_ih x + b_ih),  v = LN_h(W_hh h' + b_hh)    over 3H each
//   r = s(u_r + v_r), z = s(u_z + v_z), n = tanh(u_n + r*v_n), h = (1-z)*n + z*h'
// State h; saved: the normalised values [6H] (u, then v); stats: the two reciprocal standard deviations;
// parameters: the norms' weight and bias [6H]; zoneout on h. Scratch: backward the gradients of the norms'
// outputs [6H].
#pragma once
#include "cells/gru.h"
#include "cells/layernorm.h"

namespace rnnext {
namespace cells {

struct LayerNormGRU {
  static constexpr const char* name = "layernorm_gru";
  static constexpr int G = 3, Z = 1, SAVED = 6, ZONED = 1, STATS = 2, PARAMS = 2, PARAM_UNITS = 6;
  static constexpr int WORK_FORWARD = 0, WORK_BACKWARD = 6;
  static constexpr bool separate_hg = true, reads_h_prev = true, reads_out = false, rows = true, proj = false;

  template <typename F, typename E>
  static RNNEXT_HD void forward_row(const F& f, int64_t r, const E& e) {
    using S = typename F::scalar;
    using A = typename F::acc;
    const auto& step = f.step;
    const auto& keep = f.keep;
    const S *xg = f.xg, *hg = f.hg, *b_ih = f.b_ih, *b_hh = f.b_hh, *w = f.param[0], *b = f.param[1],
            *h_prev = f.h_prev;
    const A eps = f.eps;
    A* rstd = f.stats;
    S *h = f.h, *y = f.y, *norm = f.saved;
    const int64_t H = step.H, s0 = r * H, g0 = 3 * r * H, n0 = 6 * r * H;
    auto px = [&]<typename V>(int64_t k) {
      const V v = Lanes<V>::load(xg + g0 + k);
      return b_ih ? v + Lanes<V>::load(b_ih + k) : v;
    };
    auto ph = [&]<typename V>(int64_t k) {
      const V v = Lanes<V>::load(hg + g0 + k);
      return b_hh ? v + Lanes<V>::load(b_hh + k) : v;
    };
    A mx, rx, mh, rh;
    moments<A>(e, 3 * H, px, eps, mx, rx);
    moments<A>(e, 3 * H, ph, eps, mh, rh);
    e.template loop<A>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      V u[3], v[3], xu[3], xv[3];
      for (int k = 0; k < 3; ++k) {
        xu[k] = (at_<V>(px, k * H + j) - V(mx)) * V(rx);
        xv[k] = (at_<V>(ph, k * H + j) - V(mh)) * V(rh);
        u[k] = affine(xu[k], w, b, k * H + j);
        v[k] = affine(xv[k], w, b, 3 * H + k * H + j);
      }
      const V prev[1] = {L::load(h_prev + s0 + j)};
      V next[1], saved[GRU::SAVED], k[1];
      const bool zoned = keep.template values<1>(r, j, H, k);
      forward_unit<GRU>(true, zoned, k, u, v, prev, next, saved);
      L::store(h + s0 + j, next[0]);
      L::store(y + s0 + j, next[0]);
      if (!norm) return;
      for (int k = 0; k < 3; ++k) {
        L::store(norm + n0 + k * H + j, xu[k]);
        L::store(norm + n0 + 3 * H + k * H + j, xv[k]);
      }
    });
    if (rstd)
      e.template loop<A>(1, [&]<typename V>(int64_t) {
        rstd[2 * r] = rx;
        rstd[2 * r + 1] = rh;
      });
  }

  template <typename F, typename E>
  static RNNEXT_HD void backward_row(const F& f, int64_t r, const E& e) {
    using S = typename F::scalar;
    using A = typename F::acc;
    const auto& step = f.step;
    const auto& keep = f.keep;
    const S *dh_next = f.dh_next, *dy = f.dy, *norm = f.saved, *w = f.param[0], *b = f.param[1], *h_prev = f.h_prev;
    const A clip = f.clip, *rstd = f.stats;
    A *work = f.work, *dw = f.dparam[0], *db = f.dparam[1];
    S *dxg = f.dxg, *dhg = f.dhg, *direct = f.direct;
    const int64_t ldg = f.ldg;
    const int64_t H = step.H, s0 = r * H, g0 = r * ldg, n0 = 6 * r * H;
    // 1. Through the cell to the norms' outputs u, v, with the sums layer norm's backward needs.
    A* dn = work + n0;
    const auto s = e.template sums<A, 4>(H, [&]<typename V>(int64_t j, V* acc) {
      using L = Lanes<V>;
      V u[3], v[3];
      for (int k = 0; k < 3; ++k) {
        u[k] = affine(L::load(norm + n0 + k * H + j), w, b, k * H + j);
        v[k] = affine(L::load(norm + n0 + 3 * H + k * H + j), w, b, 3 * H + k * H + j);
      }
      const V prev[1] = {L::load(h_prev + s0 + j)};
      V next[1], saved[GRU::SAVED], dnext[1] = {state_grad<V>(dh_next, dy, s0 + j, clip)}, dprev[1], k[1];
      GRU::forward(u, v, prev, next, saved);  // the gates again, from the saved norms
      V du[3], dv[3];
      const bool zoned = keep.template values<1>(r, j, H, k);
      backward_unit<GRU>(true, zoned, k, saved, prev, next, dnext, du, dv, dprev);
      L::store(direct + s0 + j, dprev[0]);
      for (int k = 0; k < 3; ++k) {
        const int64_t ku = k * H + j, kv = 3 * H + k * H + j;
        L::store(dn + ku, du[k]);
        L::store(dn + kv, dv[k]);
        const V xu = L::load(norm + n0 + ku), xv = L::load(norm + n0 + kv);
        add_ln_grads(dw + n0, db + n0, ku, du[k], xu);
        add_ln_grads(dw + n0, db + n0, kv, dv[k], xv);
        const V dxu = du[k] * L::load(w + ku), dxv = dv[k] * L::load(w + kv);
        acc[0] = acc[0] + dxu;
        acc[1] = acc[1] + dxu * xu;
        acc[2] = acc[2] + dxv;
        acc[3] = acc[3] + dxv * xv;
      }
    });
    // 2. Through each norm to its projection.
    const A rx = rstd[2 * r], rh = rstd[2 * r + 1];
    e.template loop<A>(3 * H, [&]<typename V>(int64_t k) {
      using L = Lanes<V>;
      L::store(dxg + g0 + k,
               ln_input_grad(L::load(dn + k) * L::load(w + k), L::load(norm + n0 + k), rx, s.v[0], s.v[1], 3 * H));
      L::store(dhg + g0 + k, ln_input_grad(L::load(dn + 3 * H + k) * L::load(w + 3 * H + k),
                                           L::load(norm + n0 + 3 * H + k), rh, s.v[2], s.v[3], 3 * H));
    });
  }
};

}  // namespace cells
}  // namespace rnnext
