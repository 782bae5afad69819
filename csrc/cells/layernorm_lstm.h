// LayerNormLSTM (torchaudio's RNN-T LSTM, layer_norm=True, with bias=False): the gates and the cell state
// normalised, the normalised cell state carried:
//   a = LN_g(W_ih x + b_ih + W_hh h' + b_hh)            over the 4H gate pre-activations
//   i, f, g, o = s(a_i), s(a_f), tanh(a_g), s(a_o);  c~ = f*c' + i*g;  c = LN_c(c~);  h = o*tanh(c)
// The LSTM's halves (cells/lstm.h) with a norm between them. States (h, c); saved: the normalised values
// [5H] (gates, then cell); stats: the two reciprocal standard deviations; parameters: the norms' weight and
// bias [5H]; zoneout on h and c (h~ from c~ before zoneout). Scratch (work, the math type): forward each
// unit's c~ and o [2H], backward i, f, g, then the gradients of the norms' outputs [5H].
#pragma once
#include "cells/layernorm.h"
#include "cells/lstm.h"

namespace rnnext {
namespace cells {

struct LayerNormLSTM {
  static constexpr const char* name = "layernorm_lstm";
  static constexpr int G = 4, Z = 2, SAVED = 5, ZONED = 2, STATS = 2, PARAMS = 2, PARAM_UNITS = 5;
  static constexpr int WORK_FORWARD = 2, WORK_BACKWARD = 5;
  static constexpr bool separate_hg = false, reads_h_prev = false, reads_out = false, rows = true, proj = false;

  template <typename F, typename E>
  static RNNEXT_HD void forward_row(const F& f, int64_t r, const E& e) {
    using S = typename F::scalar;
    using A = typename F::acc;
    const auto& step = f.step;
    const auto& keep = f.keep;
    const S *xg = f.xg, *hg = f.hg, *b_ih = f.b_ih, *b_hh = f.b_hh, *w = f.param[0], *b = f.param[1],
            *h_prev = f.h_prev;
    const A eps = f.eps, *c_prev = f.st_prev;
    A *c = f.st, *rstd = f.stats, *work = f.work;
    S *c_out = f.st_out, *h = f.h, *y = f.y, *norm = f.saved;
    const int64_t H = step.H, s0 = r * H, g0 = 4 * r * H;
    auto pre = [&]<typename V>(int64_t k) {
      V v = Lanes<V>::load(xg + g0 + k) + Lanes<V>::load(hg + g0 + k);
      if (b_ih) v = v + Lanes<V>::load(b_ih + k);
      if (b_hh) v = v + Lanes<V>::load(b_hh + k);
      return v;
    };
    A mg, rg, mc, rc;
    moments<A>(e, 4 * H, pre, eps, mg, rg);
    // the gates of units j.. and c~ = f*c' + i*g: c~ and o into work, the normalised gates into norm
    A* ct = work + 2 * s0;
    A* o = ct + H;
    e.template loop<A>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      V x[4];
      for (int k = 0; k < 4; ++k) x[k] = (at_<V>(pre, k * H + j) - V(mg)) * V(rg);
      const auto a = lstm_gates(affine(x[0], w, b, j), affine(x[1], w, b, H + j), affine(x[2], w, b, 2 * H + j),
                                affine(x[3], w, b, 3 * H + j));
      L::store(o + j, a.o);
      L::store(ct + j, lstm_state(a, L::load(c_prev + s0 + j)));
      if (norm)
        for (int k = 0; k < 4; ++k) L::store(norm + 5 * s0 + k * H + j, x[k]);
    });
    moments<A>(e, H, [&]<typename V>(int64_t j) { return Lanes<V>::load(ct + j); }, eps, mc, rc);
    e.template loop<A>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      const V chat = (L::load(ct + j) - V(mc)) * V(rc), cl = affine(chat, w, b, 4 * H + j);
      V next[2] = {L::load(o + j) * L::tanh(cl), cl};
      V k[2];
      if (keep.template values<2>(r, j, H, k)) {
        const V prev[2] = {L::load(h_prev + s0 + j), L::load(c_prev + s0 + j)};
        zoneout_mix<2>(k, prev, next);
      }
      L::store(c + s0 + j, next[1]);
      if (c_out) L::store(c_out + s0 + j, next[1]);
      L::store(h + s0 + j, next[0]);
      L::store(y + s0 + j, next[0]);
      if (norm) L::store(norm + 5 * s0 + 4 * H + j, chat);
    });
    if (rstd)
      e.template loop<A>(1, [&]<typename V>(int64_t) {
        rstd[2 * r] = rg;
        rstd[2 * r + 1] = rc;
      });
  }

  template <typename F, typename E>
  static RNNEXT_HD void backward_row(const F& f, int64_t r, const E& e) {
    using S = typename F::scalar;
    using A = typename F::acc;
    const auto& step = f.step;
    const auto& keep = f.keep;
    const S *dh_next = f.dh_next, *dy = f.dy, *norm = f.saved, *w = f.param[0], *b = f.param[1], *c_prev = f.st_prev;
    const A clip = f.clip, *rstd = f.stats;
    A *dc = f.dst, *work = f.work, *dw = f.dparam[0], *db = f.dparam[1];
    S *dgates = f.dxg, *direct = f.direct;
    const int64_t ldg = f.ldg;
    const int64_t H = step.H, s0 = r * H, g0 = r * ldg, n0 = 5 * r * H;
    const A rg = rstd[2 * r], rc = rstd[2 * r + 1];
    A* dn = work + n0;
    // 1. Through h = o*tanh(c) and zoneout to the cell norm's output and a_o's gradient.
    const auto s = e.template sums<A, 2>(H, [&]<typename V>(int64_t j, V* acc) {
      using L = Lanes<V>;
      const auto a =
          lstm_gates(affine(L::load(norm + n0 + j), w, b, j), affine(L::load(norm + n0 + H + j), w, b, H + j),
                     affine(L::load(norm + n0 + 2 * H + j), w, b, 2 * H + j),
                     affine(L::load(norm + n0 + 3 * H + j), w, b, 3 * H + j));
      L::store(dn + j, a.i);
      L::store(dn + H + j, a.f);
      L::store(dn + 2 * H + j, a.g);
      const V chat = L::load(norm + n0 + 4 * H + j), tc = L::tanh(affine(chat, w, b, 4 * H + j));
      V dnext[2] = {state_grad<V>(dh_next, dy, s0 + j, clip), L::load(dc + s0 + j)}, kept[2] = {V(0), V(0)};
      V k[2];
      if (keep.template values<2>(r, j, H, k)) zoneout_split<2>(k, dnext, kept);
      if (direct) L::store(direct + s0 + j, kept[0]);
      L::store(dc + s0 + j, kept[1]);  // the part of dc' that skips the cell; 2. adds the cell's
      const V dh = dnext[0], dct = dnext[1];
      const V dcl = dct + dh * a.o * dtanh(tc);
      L::store(dn + 4 * H + j, dcl);
      L::store(dn + 3 * H + j, dh * tc * dsigmoid(a.o));
      add_ln_grads(dw + n0, db + n0, 4 * H + j, dcl, chat);
      const V dxw = dcl * L::load(w + 4 * H + j);
      acc[0] = acc[0] + dxw;
      acc[1] = acc[1] + dxw * chat;
    });
    // 2. Through the cell norm to c~ = f*c' + i*g: the other gates, dc'.
    const auto t = e.template sums<A, 2>(H, [&]<typename V>(int64_t j, V* acc) {
      using L = Lanes<V>;
      const LSTMGates<V> a{L::load(dn + j), L::load(dn + H + j), L::load(dn + 2 * H + j), V(0)};
      const V chat = L::load(norm + n0 + 4 * H + j), cp = L::load(c_prev + s0 + j);
      const V dcn = ln_input_grad(L::load(dn + 4 * H + j) * L::load(w + 4 * H + j), chat, rc, s.v[0], s.v[1], H);
      LSTMGates<V> d;
      const V dcp = lstm_state_backward(dcn, a, cp, d);
      const V da[4] = {d.i, d.f, d.g, L::load(dn + 3 * H + j)};
      L::store(dc + s0 + j, dcp + L::load(dc + s0 + j));
      for (int k = 0; k < 4; ++k) {
        if (k < 3) L::store(dn + k * H + j, da[k]);
        const V xhat = L::load(norm + n0 + k * H + j), dxw = da[k] * L::load(w + k * H + j);
        add_ln_grads(dw + n0, db + n0, k * H + j, da[k], xhat);
        acc[0] = acc[0] + dxw;
        acc[1] = acc[1] + dxw * xhat;
      }
    });
    // 3. Through the gates' norm to the pre-activations.
    e.template loop<A>(4 * H, [&]<typename V>(int64_t k) {
      using L = Lanes<V>;
      L::store(dgates + g0 + k,
               ln_input_grad(L::load(dn + k) * L::load(w + k), L::load(norm + n0 + k), rg, t.v[0], t.v[1], 4 * H));
    });
  }
};

}  // namespace cells
}  // namespace rnnext
