// Layer-normalised cells: one row (one sequence of the batch) per call, since layer norm reduces over a
// row. Written once over a row executor E, which the CPU runs with one thread per row, in vectors (cpu/
// kernels.cpp VecRow), and CUDA with one block per row (cuda/kernels.cu BlockRow):
//   e.template loop<A>(n, fn)   fn.template operator()<V>(k) for k < n, V a vector of A at k..k+lanes or
//                               A itself, the work shared by E's threads
//   e.template sums<A, M>(n, fn)   fn.template operator()<V>(k, acc) for k < n as loop does, adding into
//                               its M accumulators V acc[M]; their totals over k and E's threads, to all of
//                               them (a barrier: loops before are done); one horizontal sum per row, not
//                               per vector
// LN(v) = (v - mean(v)) / sqrt(var(v) + eps) * w + b over the row's features (biased variance).
//
// LayerNormLSTM (torchaudio's RNN-T LSTM, layer_norm=True): gates and cell normalised, the normalised
// cell state carried:
//   a = LN_g(W_ih x + b_ih + W_hh h' + b_hh)            over the 4H gate pre-activations
//   i, f, g, o = s(a_i), s(a_f), tanh(a_g), s(a_o);  c~ = f*c' + i*g;  c = LN_c(c~);  h = o*tanh(c)
// LayerNormGRU (Haste's LayerNormGRU with bias=False; biases, when given, inside the norms): input and hidden
// projections normalised separately:
//   u = LN_x(W_ih x + b_ih),  v = LN_h(W_hh h' + b_hh)    over 3H each
//   r = s(u_r + v_r), z = s(u_z + v_z), n = tanh(u_n + r*v_n), h = (1-z)*n + z*h'
// Zoneout (cells/step.h) applies to the carried state: c = k*c' + (1-k)*LN_c(c~), h = k*h' + (1-k)*o*tanh(...).
// Each row's scratch (`work`, in the math type) keeps gates between a row's loops instead of computing
// them twice. Saved for backward per row: the normalised values (before w, b), `norm` [5H] (LSTM: gates, then cell) or
// [6H] (GRU: u, then v), and the two reciprocal standard deviations `rstd` [2]. Backward adds each
// row's part of the norms' weight and bias gradients into that row's sums over the steps (`dw`, `db`
// [B, 5H or 6H], laid out as norm; a row is the same thread's or block's at every step, so no two
// writers meet), which the driver adds over the rows once: a pass over the gradients of the norms'
// outputs per chunk of steps (ATen's mul and sums) cost ~3% of a LayerNormLSTM's fwd+bwd, ~7% of a
// LayerNormGRU's. (One slot per thread instead of per row, keeping the sums in L1: no change measured.)
#pragma once
#include "cells/step.h"

namespace rnnext {
namespace cells {

RNNEXT_HD float rsqrt_(float x) { return 1.f / sqrtf(x); }
RNNEXT_HD double rsqrt_(double x) { return 1. / sqrt(x); }

// fn's value at k, computed in V (a generic lambda's template operator)
template <typename V, typename Fn>
RNNEXT_HD V at_(const Fn& fn, int64_t k) {
  return fn.template operator()<V>(k);
}

// M totals of a row executor's sums.
template <typename A, int M>
struct Sums {
  A v[M];
};

// Mean and reciprocal standard deviation of pre(k), k < n (two passes: no cancellation).
template <typename A, typename E, typename Pre>
RNNEXT_HD void moments(const E& e, int64_t n, const Pre& pre, A eps, A& mean, A& rstd) {
  mean = e.template sums<A, 1>(n, [&]<typename V>(int64_t k, V* s) { s[0] = s[0] + at_<V>(pre, k); }).v[0] / A(n);
  const A var = e.template sums<A, 1>(n, [&]<typename V>(int64_t k, V* s) {
                   const V d = at_<V>(pre, k) - V(mean);
                   s[0] = s[0] + d * d;
                 }).v[0] / A(n);
  rstd = rsqrt_(var + eps);
}

// Layer norm's backward for one element: the gradient of its input from dxw (the gradient of its output
// times w), xhat and rstd; s1 = sum(dxw), s2 = sum(dxw*xhat) over the n features.
template <typename V, typename A>
RNNEXT_HD V ln_input_grad(V dxw, V xhat, A rstd, A s1, A s2, int64_t n) {
  return V(rstd) * (dxw - V(s1 / A(n)) - xhat * V(s2 / A(n)));
}

template <typename V, typename S>
RNNEXT_HD V affine(V xhat, const S* w, const S* b, int64_t k) {
  return xhat * Lanes<V>::load(w + k) + Lanes<V>::load(b + k);
}

// A row's sums of its norms' weight and bias gradients at feature k: d the gradient of the norm's output.
template <typename V, typename A>
RNNEXT_HD void add_ln_grads(A* dw, A* db, int64_t k, V d, V xhat) {
  Lanes<V>::store(dw + k, Lanes<V>::load(dw + k) + d * xhat);
  Lanes<V>::store(db + k, Lanes<V>::load(db + k) + d);
}

template <typename S, typename A>
struct LNLSTMFwd {
  using scalar = S;
  using acc = A;
  Step step;
  const S *xg, *hg, *b_ih, *b_hh;  // [B, 4H] (xg: this step's), biases [4H] nullable
  const S *w, *b;                  // layer norms' weight and bias [5H]: gates, then cell
  A eps;
  const A* c_prev;  // [B, H] (may alias c)
  const S* h_prev;  // [B, H] (may alias h)
  A* c;
  S *c_out, *h, *y;  // c_out [B, H] (c after the step, for backward) nullable
  S* norm;           // [B, 5H] nullable (no backward to follow)
  A* rstd;           // [B, 2] nullable with norm
  Keep<S, A> keep;
  A* work;           // [B, 2H] scratch: each unit's c~ and o

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = 4 * r * H;
    if (!step.active(r)) {
      e.template loop<A>(H, [&]<typename V>(int64_t j) {
        Lanes<V>::store(c + s0 + j, Lanes<V>::load(c_prev + s0 + j));
        Lanes<V>::store(h + s0 + j, Lanes<V>::load(h_prev + s0 + j));
        Lanes<V>::store(y + s0 + j, V(0));
        if (c_out) Lanes<V>::store(c_out + s0 + j, V(0));
      });
      if (norm) e.template loop<A>(5 * H, [&]<typename V>(int64_t k) { Lanes<V>::store(norm + 5 * s0 + k, V(0)); });
      if (rstd) e.template loop<A>(1, [&]<typename V>(int64_t) { rstd[2 * r] = rstd[2 * r + 1] = A(0); });
      return;
    }
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
    if (rstd) e.template loop<A>(1, [&]<typename V>(int64_t) {
        rstd[2 * r] = rg;
        rstd[2 * r + 1] = rc;
      });
  }
};

// dc [B, H] in/out (A): the gradient of c, then of c'. dgates [B, 4H]: of the gate pre-activations (both
// projections'); direct [B, H]: of h' not through hg (nullable where that is 0: no lengths, no zoneout);
// dw, db [B, 5H] in/out (A): the rows' sums of the norms' weight and bias gradients.
template <typename S, typename A>
struct LNLSTMBwd {
  using scalar = S;
  using acc = A;
  Step step;
  const S *dh_next, *dy, *norm, *w, *b, *c_prev;
  const A* rstd;
  A* dc;
  S *dgates, *direct;
  A clip;
  Keep<S, A> keep;
  A* work;  // [B, 5H] scratch: each unit's i, f, g, then the gradients of the norms' outputs (as norm)
  A *dw, *db;
  int64_t ldg;  // dgates' row stride (cells/step.h)

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = r * ldg, n0 = 5 * r * H;
    if (!step.active(r)) {
      e.template loop<A>(4 * H, [&]<typename V>(int64_t k) { Lanes<V>::store(dgates + g0 + k, V(0)); });
      if (direct)
        e.template loop<A>(H, [&]<typename V>(int64_t j) {
          Lanes<V>::store(direct + s0 + j, Lanes<V>::load(dh_next + s0 + j));
        });
      return;
    }
    const A rg = rstd[2 * r], rc = rstd[2 * r + 1];
    A* dn = work + n0;
    // 1. Through h = o*tanh(c) and zoneout to the cell norm's output and a_o's gradient.
    const auto s = e.template sums<A, 2>(H, [&]<typename V>(int64_t j, V* acc) {
      using L = Lanes<V>;
      const auto a = lstm_gates(affine(L::load(norm + n0 + j), w, b, j), affine(L::load(norm + n0 + H + j), w, b, H + j),
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

template <typename S, typename A>
struct LNGRUFwd {
  using scalar = S;
  using acc = A;
  Step step;
  const S *xg, *hg, *b_ih, *b_hh;  // [B, 3H] (xg: this step's), biases [3H] nullable
  const S *w, *b;                  // layer norms' weight and bias [6H]: input's, then hidden's
  A eps;
  const S* h_prev;
  S *h, *y;
  S* norm;  // [B, 6H] nullable
  A* rstd;  // [B, 2] nullable with norm
  Keep<S, A> keep;

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = 3 * r * H, n0 = 6 * r * H;
    if (!step.active(r)) {
      e.template loop<A>(H, [&]<typename V>(int64_t j) {
        Lanes<V>::store(h + s0 + j, Lanes<V>::load(h_prev + s0 + j));
        Lanes<V>::store(y + s0 + j, V(0));
      });
      if (norm) e.template loop<A>(6 * H, [&]<typename V>(int64_t k) { Lanes<V>::store(norm + n0 + k, V(0)); });
      if (rstd) e.template loop<A>(1, [&]<typename V>(int64_t) { rstd[2 * r] = rstd[2 * r + 1] = A(0); });
      return;
    }
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
    if (rstd) e.template loop<A>(1, [&]<typename V>(int64_t) {
        rstd[2 * r] = rx;
        rstd[2 * r + 1] = rh;
      });
  }
};

// dxg, dhg [B, 3H]: gradients of the two projections; direct [B, H] (of h' not through hg); dw, db [B, 6H]
// as LNLSTMBwd's.
template <typename S, typename A>
struct LNGRUBwd {
  using scalar = S;
  using acc = A;
  Step step;
  const S *dh_next, *dy, *norm, *w, *b, *h_prev;
  const A* rstd;
  S *dxg, *dhg, *direct;
  A clip;
  Keep<S, A> keep;
  A* work;  // [B, 6H] scratch: the gradients of the norms' outputs (as norm)
  A *dw, *db;
  int64_t ldg;  // dxg's and dhg's row stride (cells/step.h)

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = r * ldg, n0 = 6 * r * H;
    if (!step.active(r)) {
      e.template loop<A>(3 * H, [&]<typename V>(int64_t k) {
        Lanes<V>::store(dxg + g0 + k, V(0));
        Lanes<V>::store(dhg + g0 + k, V(0));
      });
      e.template loop<A>(H, [&]<typename V>(int64_t j) {
        Lanes<V>::store(direct + s0 + j, Lanes<V>::load(dh_next + s0 + j));
      });
      return;
    }
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
