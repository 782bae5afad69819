// Layer-normalised cells: one row (one sequence of the batch) per call, since layer norm reduces over a
// row. Written once over a row executor E, which the CPU runs with one thread per row (SerialRow) and
// CUDA with one block per row (cuda/kernels.cu):
//   e.loop(n, fn)   fn(k) for k < n, the work shared by E's threads
//   e.sum(v)        the sum of v over E's threads, to all of them (a barrier: loops before are done)
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
// Saved for backward per row: the normalised values (before w, b), `norm` [5H] (LSTM: gates, then cell) or
// [6H] (GRU: u, then v), and the two reciprocal standard deviations `rstd` [2]. Backward writes the
// gradients of the layer norms' outputs (`dln`, laid out as norm) from which the driver sums the
// gradients of w and b.
#pragma once
#include "cells/step.h"

namespace rnnext {
namespace cells {

RNNEXT_HD float rsqrt_(float x) { return 1.f / sqrtf(x); }
RNNEXT_HD double rsqrt_(double x) { return 1. / sqrt(x); }

struct SerialRow {
  template <typename Fn>
  RNNEXT_HD void loop(int64_t n, const Fn& fn) const {
    for (int64_t k = 0; k < n; ++k) fn(k);
  }
  template <typename A>
  RNNEXT_HD A sum(A v) const {
    return v;
  }
};

// Mean and reciprocal standard deviation of pre(k), k < n (two passes: no cancellation).
template <typename A, typename E, typename Pre>
RNNEXT_HD void moments(const E& e, int64_t n, const Pre& pre, A eps, A& mean, A& rstd) {
  A s = A(0);
  e.loop(n, [&](int64_t k) { s += pre(k); });
  mean = e.sum(s) / A(n);
  A v = A(0);
  e.loop(n, [&](int64_t k) {
    const A d = pre(k) - mean;
    v += d * d;
  });
  rstd = rsqrt_(e.sum(v) / A(n) + eps);
}

// Layer norm's backward over one row: the gradient of its input, given dy (gradient of its output,
// w applied by the caller: dxw = dy*w) through xhat and rstd. s1 = sum(dxw), s2 = sum(dxw*xhat) over n.
template <typename A>
RNNEXT_HD A ln_input_grad(A dxw, A xhat, A rstd, A s1, A s2, int64_t n) {
  return rstd * (dxw - s1 / A(n) - xhat * s2 / A(n));
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

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = 4 * r * H;
    if (!step.active(r)) {
      e.loop(H, [&](int64_t j) {
        c[s0 + j] = c_prev[s0 + j];
        h[s0 + j] = h_prev[s0 + j];
        y[s0 + j] = S(0.f);
        if (c_out) c_out[s0 + j] = S(0.f);
      });
      if (norm) e.loop(5 * H, [&](int64_t k) { norm[5 * s0 + k] = S(0.f); });
      if (rstd) e.loop(2, [&](int64_t k) { rstd[2 * r + k] = A(0); });
      return;
    }
    auto pre = [&](int64_t k) {
      A v = A(xg[g0 + k]) + A(hg[g0 + k]);
      if (b_ih) v += A(b_ih[k]);
      if (b_hh) v += A(b_hh[k]);
      return v;
    };
    A mg, rg, mc, rc;
    moments<A>(e, 4 * H, pre, eps, mg, rg);
    // gates of unit j and c~ (computed again in the last loop: c' may alias c)
    auto cell = [&](int64_t j, LSTMGates<A>& a, A x[4]) {
      A v[4];
      for (int k = 0; k < 4; ++k) {
        x[k] = (pre(k * H + j) - mg) * rg;
        v[k] = x[k] * A(w[k * H + j]) + A(b[k * H + j]);
      }
      a.i = sigmoid(v[0]);
      a.f = sigmoid(v[1]);
      a.g = Lanes<A>::tanh(v[2]);
      a.o = sigmoid(v[3]);
      return a.f * c_prev[s0 + j] + a.i * a.g;
    };
    moments<A>(
        e, H,
        [&](int64_t j) {
          LSTMGates<A> a;
          A x[4];
          return cell(j, a, x);
        },
        eps, mc, rc);
    e.loop(H, [&](int64_t j) {
      LSTMGates<A> a;
      A x[4];
      const A chat = (cell(j, a, x) - mc) * rc, cl = chat * A(w[4 * H + j]) + A(b[4 * H + j]);
      A cn = cl, hn = a.o * Lanes<A>::tanh(cl);
      if (keep.on()) {
        const A kh = keep.template at<A>(r, j, H, 0), kc = keep.template at<A>(r, j, H, 1);
        cn = kc * c_prev[s0 + j] + (A(1) - kc) * cn;
        hn = kh * A(h_prev[s0 + j]) + (A(1) - kh) * hn;
      }
      c[s0 + j] = cn;
      if (c_out) c_out[s0 + j] = S(cn);
      h[s0 + j] = S(hn);
      y[s0 + j] = S(hn);
      if (!norm) return;
      for (int k = 0; k < 4; ++k) norm[5 * s0 + k * H + j] = S(x[k]);
      norm[5 * s0 + 4 * H + j] = S(chat);
    });
    if (rstd) e.loop(1, [&](int64_t) {
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

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    const int64_t H = step.H, s0 = r * H, g0 = 4 * r * H, n0 = 5 * r * H;
    if (!step.active(r)) {
      e.loop(4 * H, [&](int64_t k) { dgates[g0 + k] = S(0.f); });
      e.loop(5 * H, [&](int64_t k) { dln[n0 + k] = S(0.f); });
      if (direct) e.loop(H, [&](int64_t j) { direct[s0 + j] = dh_next[s0 + j]; });
      return;
    }
    const A rg = rstd[2 * r], rc = rstd[2 * r + 1];
    auto gates = [&](int64_t j, LSTMGates<A>& a) {
      A v[4];
      for (int k = 0; k < 4; ++k) v[k] = A(norm[n0 + k * H + j]) * A(w[k * H + j]) + A(b[k * H + j]);
      a = {sigmoid(v[0]), sigmoid(v[1]), Lanes<A>::tanh(v[2]), sigmoid(v[3])};
    };
    // 1. Through h = o*tanh(c) and zoneout to the cell norm's output: dln's cell part, a_o's gradient.
    A s1 = A(0), s2 = A(0);
    e.loop(H, [&](int64_t j) {
      LSTMGates<A> a;
      gates(j, a);
      const A chat = A(norm[n0 + 4 * H + j]), tc = Lanes<A>::tanh(chat * A(w[4 * H + j]) + A(b[4 * H + j]));
      A dh = state_grad<A>(dh_next, dy, s0 + j, clip), dct = dc[s0 + j];
      if (keep.on()) {
        const A kh = keep.template at<A>(r, j, H, 0), kc = keep.template at<A>(r, j, H, 1);
        direct[s0 + j] = S(kh * dh);
        dh = (A(1) - kh) * dh;
        dct = (A(1) - kc) * dct;
      } else if (direct) {
        direct[s0 + j] = S(0.f);
      }
      const A dcl = dct + dh * a.o * dtanh(tc);
      dln[n0 + 4 * H + j] = S(dcl);
      dln[n0 + 3 * H + j] = S(dh * tc * dsigmoid(a.o));
      const A dxw = dcl * A(w[4 * H + j]);
      s1 += dxw;
      s2 += dxw * chat;
    });
    s1 = e.sum(s1);
    s2 = e.sum(s2);
    // 2. Through the cell norm to c~ = f*c' + i*g: the other gates, dc'.
    A t1 = A(0), t2 = A(0);
    e.loop(H, [&](int64_t j) {
      LSTMGates<A> a;
      gates(j, a);
      const A chat = A(norm[n0 + 4 * H + j]), cp = A(c_prev[s0 + j]);
      const A dcn = ln_input_grad(A(dln[n0 + 4 * H + j]) * A(w[4 * H + j]), chat, rc, s1, s2, H);
      const A da[4] = {dcn * a.g * dsigmoid(a.i), dcn * cp * dsigmoid(a.f), dcn * a.i * dtanh(a.g),
                       A(dln[n0 + 3 * H + j])};
      const A kc = keep.on() ? keep.template at<A>(r, j, H, 1) : A(0);
      dc[s0 + j] = dcn * a.f + kc * dc[s0 + j];
      for (int k = 0; k < 4; ++k) {
        if (k < 3) dln[n0 + k * H + j] = S(da[k]);
        const A dxw = da[k] * A(w[k * H + j]);
        t1 += dxw;
        t2 += dxw * A(norm[n0 + k * H + j]);
      }
    });
    t1 = e.sum(t1);
    t2 = e.sum(t2);
    // 3. Through the gates' norm to the pre-activations.
    e.loop(4 * H, [&](int64_t k) {
      dgates[g0 + k] = S(ln_input_grad(A(dln[n0 + k]) * A(w[k]), A(norm[n0 + k]), rg, t1, t2, 4 * H));
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
      e.loop(H, [&](int64_t j) {
        h[s0 + j] = h_prev[s0 + j];
        y[s0 + j] = S(0.f);
      });
      if (norm) e.loop(6 * H, [&](int64_t k) { norm[n0 + k] = S(0.f); });
      if (rstd) e.loop(2, [&](int64_t k) { rstd[2 * r + k] = A(0); });
      return;
    }
    auto px = [&](int64_t k) { return A(xg[g0 + k]) + (b_ih ? A(b_ih[k]) : A(0)); };
    auto ph = [&](int64_t k) { return A(hg[g0 + k]) + (b_hh ? A(b_hh[k]) : A(0)); };
    A mx, rx, mh, rh;
    moments<A>(e, 3 * H, px, eps, mx, rx);
    moments<A>(e, 3 * H, ph, eps, mh, rh);
    e.loop(H, [&](int64_t j) {
      A u[3], v[3], xu[3], xv[3];
      for (int k = 0; k < 3; ++k) {
        xu[k] = (px(k * H + j) - mx) * rx;
        xv[k] = (ph(k * H + j) - mh) * rh;
        u[k] = xu[k] * A(w[k * H + j]) + A(b[k * H + j]);
        v[k] = xv[k] * A(w[3 * H + k * H + j]) + A(b[3 * H + k * H + j]);
      }
      GRUGates<A> a;
      A hn = gru_forward(u[0], u[1], u[2], v[0], v[1], v[2], A(h_prev[s0 + j]), a);
      if (keep.on()) {
        const A k = keep.template at<A>(r, j, H, 0);
        hn = k * A(h_prev[s0 + j]) + (A(1) - k) * hn;
      }
      h[s0 + j] = S(hn);
      y[s0 + j] = S(hn);
      if (!norm) return;
      for (int k = 0; k < 3; ++k) {
        norm[n0 + k * H + j] = S(xu[k]);
        norm[n0 + 3 * H + k * H + j] = S(xv[k]);
      }
    });
    if (rstd) e.loop(1, [&](int64_t) {
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
      e.loop(3 * H, [&](int64_t k) {
        dxg[g0 + k] = S(0.f);
        dhg[g0 + k] = S(0.f);
      });
      e.loop(6 * H, [&](int64_t k) { dln[n0 + k] = S(0.f); });
      e.loop(H, [&](int64_t j) { direct[s0 + j] = dh_next[s0 + j]; });
      return;
    }
    // 1. Through the cell to the norms' outputs u, v (dln), with the sums layer norm's backward needs.
    A ux1 = A(0), ux2 = A(0), uh1 = A(0), uh2 = A(0);
    e.loop(H, [&](int64_t j) {
      A u[3], v[3];
      for (int k = 0; k < 3; ++k) {
        u[k] = A(norm[n0 + k * H + j]) * A(w[k * H + j]) + A(b[k * H + j]);
        v[k] = A(norm[n0 + 3 * H + k * H + j]) * A(w[3 * H + k * H + j]) + A(b[3 * H + k * H + j]);
      }
      GRUGates<A> a;
      const A hp = A(h_prev[s0 + j]);
      gru_forward(u[0], u[1], u[2], v[0], v[1], v[2], hp, a);
      A dh = state_grad<A>(dh_next, dy, s0 + j, clip), kdh = A(0);
      if (keep.on()) {
        const A k = keep.template at<A>(r, j, H, 0);
        kdh = k * dh;
        dh = (A(1) - k) * dh;
      }
      A du[3], dv[3];
      direct[s0 + j] = S(gru_backward(dh, a, hp, du[0], du[1], du[2], dv[2]) + kdh);
      dv[0] = du[0];
      dv[1] = du[1];
      for (int k = 0; k < 3; ++k) {
        dln[n0 + k * H + j] = S(du[k]);
        dln[n0 + 3 * H + k * H + j] = S(dv[k]);
        const A dxu = du[k] * A(w[k * H + j]), dxv = dv[k] * A(w[3 * H + k * H + j]);
        ux1 += dxu;
        ux2 += dxu * A(norm[n0 + k * H + j]);
        uh1 += dxv;
        uh2 += dxv * A(norm[n0 + 3 * H + k * H + j]);
      }
    });
    ux1 = e.sum(ux1);
    ux2 = e.sum(ux2);
    uh1 = e.sum(uh1);
    uh2 = e.sum(uh2);
    // 2. Through each norm to its projection.
    const A rx = rstd[2 * r], rh = rstd[2 * r + 1];
    e.loop(3 * H, [&](int64_t k) {
      dxg[g0 + k] = S(ln_input_grad(A(dln[n0 + k]) * A(w[k]), A(norm[n0 + k]), rx, ux1, ux2, 3 * H));
      dhg[g0 + k] =
          S(ln_input_grad(A(dln[n0 + 3 * H + k]) * A(w[3 * H + k]), A(norm[n0 + 3 * H + k]), rh, uh1, uh2, 3 * H));
    });
  }
};

}  // namespace cells
}  // namespace rnnext
