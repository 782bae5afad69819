// Layer-normalised cells: one row (one sequence of the batch) per call, since layer norm reduces over a
// row. Written once over a row executor E, which the CPU runs with one thread per row, in vectors (cpu/
// kernels.cpp VecRow), and CUDA with one block per row (cuda/kernels.cu BlockRow):
//   e.template loop<A>(n, fn)   fn.template operator()<V>(k) for k < n, V a vector of A at k..k+lanes or
//                               A itself, the work shared by E's threads
//   e.sum(v)                    the sum of v over E's threads, to all of them (a barrier: loops before are done)
// LN(v) = (v - mean(v)) / sqrt(var(v) + eps) * w + b over the row's features (biased variance).
//
// LayerNormLSTM (torchaudio's RNN-T LSTM, layer_norm=True): gates and cell normalised, the normalised
// cell state carried:
//   a = LN_g(W_ih x + b_ih + W_hh h' + b_hh)            over the 4H gate pre-activations
//   i, f, g, o = s(a_i), s(a_f), tanh(a_g), s(a_o);  c~ = f*c' + i*g;  c = LN_c(c~);  h = o*tanh(c)
// LayerNormGRU (Haste's LayerNormGRU): input and hidden projections normalised separately:
//   u = LN_x(W_ih x + b_ih),  v = LN_h(W_hh h' + b_hh)    over 3H each
//   r = s(u_r + v_r), z = s(u_z + v_z), n = tanh(u_n + r*v_n), h = (1-z)*n + z*h'
// Zoneout (cells/step.h) applies to the carried state: c = k*c' + (1-k)*LN_c(c~), h = k*h' + (1-k)*o*tanh(...).
// Each row's scratch (`work`, in the math type) keeps gates between a row's loops instead of computing
// them twice. Saved for backward per row: the normalised values (before w, b), `norm` [5H] (LSTM: gates, then cell) or
// [6H] (GRU: u, then v), and the two reciprocal standard deviations `rstd` [2]. Backward writes the
// gradients of the layer norms' outputs (`dln`, laid out as norm) from which the driver sums the
// gradients of w and b.
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

// Mean and reciprocal standard deviation of pre(k), k < n (two passes: no cancellation).
template <typename A, typename E, typename Pre>
RNNEXT_HD void moments(const E& e, int64_t n, const Pre& pre, A eps, A& mean, A& rstd) {
  A s = A(0);
  e.template loop<A>(n, [&]<typename V>(int64_t k) { s += Lanes<V>::sum(at_<V>(pre, k)); });
  mean = e.sum(s) / A(n);
  A v = A(0);
  e.template loop<A>(n, [&]<typename V>(int64_t k) {
    const V d = at_<V>(pre, k) - V(mean);
    v += Lanes<V>::sum(d * d);
  });
  rstd = rsqrt_(e.sum(v) / A(n) + eps);
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
      const V i = sigmoid(affine(x[0], w, b, j)), f = sigmoid(affine(x[1], w, b, H + j)),
              g = L::tanh(affine(x[2], w, b, 2 * H + j));
      L::store(o + j, sigmoid(affine(x[3], w, b, 3 * H + j)));
      L::store(ct + j, f * L::load(c_prev + s0 + j) + i * g);
      if (norm)
        for (int k = 0; k < 4; ++k) L::store(norm + 5 * s0 + k * H + j, x[k]);
    });
    moments<A>(e, H, [&]<typename V>(int64_t j) { return Lanes<V>::load(ct + j); }, eps, mc, rc);
    e.template loop<A>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      const V chat = (L::load(ct + j) - V(mc)) * V(rc), cl = affine(chat, w, b, 4 * H + j);
      V cn = cl, hn = L::load(o + j) * L::tanh(cl);
      if (keep.on()) {
        const V kh = keep.template at<V>(r, j, H, 0), kc = keep.template at<V>(r, j, H, 1);
        cn = kc * L::load(c_prev + s0 + j) + (V(1) - kc) * cn;
        hn = kh * L::load(h_prev + s0 + j) + (V(1) - kh) * hn;
      }
      L::store(c + s0 + j, cn);
      if (c_out) L::store(c_out + s0 + j, cn);
      L::store(h + s0 + j, hn);
      L::store(y + s0 + j, hn);
      if (norm) L::store(norm + 5 * s0 + 4 * H + j, chat);
    });
    if (rstd) e.template loop<A>(1, [&]<typename V>(int64_t) {
        rstd[2 * r] = rg;
        rstd[2 * r + 1] = rc;
      });
  }
};

// dc [B, H] in/out (A): the gradient of c, then of c'. dgates [B, 4H]: of the gate pre-activations (both
// projections'); dln [B, 5H]: of the layer norms' outputs; direct [B, H]: of h' not through hg (nullable
// where that is 0: no lengths, no zoneout).
template <typename S, typename A>
struct LNLSTMBwd {
  using scalar = S;
  using acc = A;
  Step step;
  const S *dh_next, *dy, *norm, *w, *b, *c_prev;
  const A* rstd;
  A* dc;
  S *dgates, *dln, *direct;
  A clip;
  Keep<S, A> keep;
  A* work;  // [B, 3H] scratch: each unit's i, f, g

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = 4 * r * H, n0 = 5 * r * H;
    if (!step.active(r)) {
      e.template loop<A>(4 * H, [&]<typename V>(int64_t k) { Lanes<V>::store(dgates + g0 + k, V(0)); });
      e.template loop<A>(5 * H, [&]<typename V>(int64_t k) { Lanes<V>::store(dln + n0 + k, V(0)); });
      if (direct)
        e.template loop<A>(H, [&]<typename V>(int64_t j) {
          Lanes<V>::store(direct + s0 + j, Lanes<V>::load(dh_next + s0 + j));
        });
      return;
    }
    const A rg = rstd[2 * r], rc = rstd[2 * r + 1];
    A* ifg = work + 3 * s0;
    // 1. Through h = o*tanh(c) and zoneout to the cell norm's output: dln's cell part, a_o's gradient.
    A s1 = A(0), s2 = A(0);
    e.template loop<A>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      LSTMGates<V> a;
      a.i = sigmoid(affine(L::load(norm + n0 + j), w, b, j));
      a.f = sigmoid(affine(L::load(norm + n0 + H + j), w, b, H + j));
      a.g = L::tanh(affine(L::load(norm + n0 + 2 * H + j), w, b, 2 * H + j));
      a.o = sigmoid(affine(L::load(norm + n0 + 3 * H + j), w, b, 3 * H + j));
      L::store(ifg + j, a.i);
      L::store(ifg + H + j, a.f);
      L::store(ifg + 2 * H + j, a.g);
      const V chat = L::load(norm + n0 + 4 * H + j), tc = L::tanh(affine(chat, w, b, 4 * H + j));
      V dh = state_grad<V>(dh_next, dy, s0 + j, clip), dct = L::load(dc + s0 + j);
      if (keep.on()) {
        const V kh = keep.template at<V>(r, j, H, 0), kc = keep.template at<V>(r, j, H, 1);
        L::store(direct + s0 + j, kh * dh);
        dh = (V(1) - kh) * dh;
        dct = (V(1) - kc) * dct;
      } else if (direct) {
        L::store(direct + s0 + j, V(0));
      }
      const V dcl = dct + dh * a.o * dtanh(tc);
      L::store(dln + n0 + 4 * H + j, dcl);
      L::store(dln + n0 + 3 * H + j, dh * tc * dsigmoid(a.o));
      const V dxw = dcl * L::load(w + 4 * H + j);
      s1 += L::sum(dxw);
      s2 += L::sum(dxw * chat);
    });
    s1 = e.sum(s1);
    s2 = e.sum(s2);
    // 2. Through the cell norm to c~ = f*c' + i*g: the other gates, dc'.
    A t1 = A(0), t2 = A(0);
    e.template loop<A>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      LSTMGates<V> a;
      a.i = L::load(ifg + j);
      a.f = L::load(ifg + H + j);
      a.g = L::load(ifg + 2 * H + j);
      const V chat = L::load(norm + n0 + 4 * H + j), cp = L::load(c_prev + s0 + j);
      const V dcn = ln_input_grad(L::load(dln + n0 + 4 * H + j) * L::load(w + 4 * H + j), chat, rc, s1, s2, H);
      const V da[4] = {dcn * a.g * dsigmoid(a.i), dcn * cp * dsigmoid(a.f), dcn * a.i * dtanh(a.g),
                       L::load(dln + n0 + 3 * H + j)};
      const V kc = keep.on() ? keep.template at<V>(r, j, H, 1) : V(0);
      L::store(dc + s0 + j, dcn * a.f + kc * L::load(dc + s0 + j));
      for (int k = 0; k < 4; ++k) {
        if (k < 3) L::store(dln + n0 + k * H + j, da[k]);
        const V dxw = da[k] * L::load(w + k * H + j);
        t1 += L::sum(dxw);
        t2 += L::sum(dxw * L::load(norm + n0 + k * H + j));
      }
    });
    t1 = e.sum(t1);
    t2 = e.sum(t2);
    // 3. Through the gates' norm to the pre-activations.
    e.template loop<A>(4 * H, [&]<typename V>(int64_t k) {
      using L = Lanes<V>;
      L::store(dgates + g0 + k,
               ln_input_grad(L::load(dln + n0 + k) * L::load(w + k), L::load(norm + n0 + k), rg, t1, t2, 4 * H));
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
      GRUGates<V> a;
      const V hp = L::load(h_prev + s0 + j);
      V hn = gru_forward(u[0], u[1], u[2], v[0], v[1], v[2], hp, a);
      if (keep.on()) {
        const V k = keep.template at<V>(r, j, H, 0);
        hn = k * hp + (V(1) - k) * hn;
      }
      L::store(h + s0 + j, hn);
      L::store(y + s0 + j, hn);
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

// dxg, dhg [B, 3H]: gradients of the two projections; dln [B, 6H]; direct [B, H] (of h' not through hg).
template <typename S, typename A>
struct LNGRUBwd {
  using scalar = S;
  using acc = A;
  Step step;
  const S *dh_next, *dy, *norm, *w, *b, *h_prev;
  const A* rstd;
  S *dxg, *dhg, *dln, *direct;
  A clip;
  Keep<S, A> keep;

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = 3 * r * H, n0 = 6 * r * H;
    if (!step.active(r)) {
      e.template loop<A>(3 * H, [&]<typename V>(int64_t k) {
        Lanes<V>::store(dxg + g0 + k, V(0));
        Lanes<V>::store(dhg + g0 + k, V(0));
      });
      e.template loop<A>(6 * H, [&]<typename V>(int64_t k) { Lanes<V>::store(dln + n0 + k, V(0)); });
      e.template loop<A>(H, [&]<typename V>(int64_t j) {
        Lanes<V>::store(direct + s0 + j, Lanes<V>::load(dh_next + s0 + j));
      });
      return;
    }
    // 1. Through the cell to the norms' outputs u, v (dln), with the sums layer norm's backward needs.
    A ux1 = A(0), ux2 = A(0), uh1 = A(0), uh2 = A(0);
    e.template loop<A>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      V u[3], v[3];
      for (int k = 0; k < 3; ++k) {
        u[k] = affine(L::load(norm + n0 + k * H + j), w, b, k * H + j);
        v[k] = affine(L::load(norm + n0 + 3 * H + k * H + j), w, b, 3 * H + k * H + j);
      }
      GRUGates<V> a;
      const V hp = L::load(h_prev + s0 + j);
      gru_forward(u[0], u[1], u[2], v[0], v[1], v[2], hp, a);
      V dh = state_grad<V>(dh_next, dy, s0 + j, clip), kdh = V(0);
      if (keep.on()) {
        const V k = keep.template at<V>(r, j, H, 0);
        kdh = k * dh;
        dh = (V(1) - k) * dh;
      }
      V du[3], dv[3];
      L::store(direct + s0 + j, gru_backward(dh, a, hp, du[0], du[1], du[2], dv[2]) + kdh);
      dv[0] = du[0];
      dv[1] = du[1];
      for (int k = 0; k < 3; ++k) {
        L::store(dln + n0 + k * H + j, du[k]);
        L::store(dln + n0 + 3 * H + k * H + j, dv[k]);
        const V dxu = du[k] * L::load(w + k * H + j), dxv = dv[k] * L::load(w + 3 * H + k * H + j);
        ux1 += L::sum(dxu);
        ux2 += L::sum(dxu * L::load(norm + n0 + k * H + j));
        uh1 += L::sum(dxv);
        uh2 += L::sum(dxv * L::load(norm + n0 + 3 * H + k * H + j));
      }
    });
    ux1 = e.sum(ux1);
    ux2 = e.sum(ux2);
    uh1 = e.sum(uh1);
    uh2 = e.sum(uh2);
    // 2. Through each norm to its projection.
    const A rx = rstd[2 * r], rh = rstd[2 * r + 1];
    e.template loop<A>(3 * H, [&]<typename V>(int64_t k) {
      using L = Lanes<V>;
      L::store(dxg + g0 + k,
               ln_input_grad(L::load(dln + n0 + k) * L::load(w + k), L::load(norm + n0 + k), rx, ux1, ux2, 3 * H));
      L::store(dhg + g0 + k, ln_input_grad(L::load(dln + n0 + 3 * H + k) * L::load(w + 3 * H + k),
                                           L::load(norm + n0 + 3 * H + k), rh, uh1, uh2, 3 * H));
    });
  }
};

}  // namespace cells
}  // namespace rnnext
