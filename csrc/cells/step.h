// One time step of each cell over a [B, H] grid: the body of every pointwise kernel, CPU and CUDA.
// A functor is called once per element idx in [0, B*H); loads and stores are in scalar_t, the math
// in acc_t (float for half/bfloat16). All buffers are contiguous, row-major:
//   xg, hg, dxg, dhg  [B, G*H]   gate rows of a batch row at b*G*H + k*H + j
//   h, c, dh, dc      [B, H]
//   saved             [B, S*H]   what backward needs, S values per element in the same row layout
#pragma once
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"

namespace rnnext {
namespace cells {

struct Index {
  int64_t b, j, H;
  RNNEXT_HD Index(int64_t idx, int64_t H_) : b(idx / H_), j(idx % H_), H(H_) {}
  // element of gate k in a [B, G*H] buffer
  RNNEXT_HD int64_t gate(int64_t G, int64_t k) const { return (b * G + k) * H + j; }
};

// saved = activated (i, f, g, o), S = 4
template <typename scalar_t, typename acc_t>
struct LSTMStepFwd {
  const scalar_t *xg, *hg, *c_prev;
  scalar_t *h, *c, *saved;
  int64_t H;
  RNNEXT_HD void operator()(int64_t idx) const {
    Index x(idx, H);
    acc_t p[4];
    for (int k = 0; k < 4; ++k) p[k] = acc_t(xg[x.gate(4, k)]) + acc_t(hg[x.gate(4, k)]);
    LSTMGates<acc_t> a;
    acc_t tanh_c;
    acc_t cn = lstm_forward(p[0], p[1], p[2], p[3], acc_t(c_prev[idx]), a, tanh_c);
    c[idx] = scalar_t(cn);
    h[idx] = scalar_t(a.o * tanh_c);
    saved[x.gate(4, 0)] = scalar_t(a.i);
    saved[x.gate(4, 1)] = scalar_t(a.f);
    saved[x.gate(4, 2)] = scalar_t(a.g);
    saved[x.gate(4, 3)] = scalar_t(a.o);
  }
};

template <typename scalar_t, typename acc_t>
struct LSTMStepBwd {
  const scalar_t *dh, *dc, *c_prev, *c, *saved;
  scalar_t *dgates, *dc_prev;
  int64_t H;
  RNNEXT_HD void operator()(int64_t idx) const {
    Index x(idx, H);
    LSTMGates<acc_t> a{acc_t(saved[x.gate(4, 0)]), acc_t(saved[x.gate(4, 1)]), acc_t(saved[x.gate(4, 2)]),
                       acc_t(saved[x.gate(4, 3)])};
    LSTMGates<acc_t> d;
    acc_t dcp = lstm_backward(acc_t(dh[idx]), acc_t(dc[idx]), a, acc_t(c_prev[idx]), acc_t(c[idx]), d);
    dgates[x.gate(4, 0)] = scalar_t(d.i);
    dgates[x.gate(4, 1)] = scalar_t(d.f);
    dgates[x.gate(4, 2)] = scalar_t(d.g);
    dgates[x.gate(4, 3)] = scalar_t(d.o);
    dc_prev[idx] = scalar_t(dcp);
  }
};

// saved = (r, z, n, hn), S = 4
template <typename scalar_t, typename acc_t>
struct GRUStepFwd {
  const scalar_t *xg, *hg, *h_prev;
  scalar_t *h, *saved;
  int64_t H;
  RNNEXT_HD void operator()(int64_t idx) const {
    Index x(idx, H);
    GRUGates<acc_t> a;
    acc_t hn = gru_forward(acc_t(xg[x.gate(3, 0)]), acc_t(xg[x.gate(3, 1)]), acc_t(xg[x.gate(3, 2)]),
                           acc_t(hg[x.gate(3, 0)]), acc_t(hg[x.gate(3, 1)]), acc_t(hg[x.gate(3, 2)]),
                           acc_t(h_prev[idx]), a);
    h[idx] = scalar_t(hn);
    saved[x.gate(4, 0)] = scalar_t(a.r);
    saved[x.gate(4, 1)] = scalar_t(a.z);
    saved[x.gate(4, 2)] = scalar_t(a.n);
    saved[x.gate(4, 3)] = scalar_t(a.hn);
  }
};

template <typename scalar_t, typename acc_t>
struct GRUStepBwd {
  const scalar_t *dh, *h_prev, *saved;
  scalar_t *dxg, *dhg, *dh_prev;
  int64_t H;
  RNNEXT_HD void operator()(int64_t idx) const {
    Index x(idx, H);
    GRUGates<acc_t> a{acc_t(saved[x.gate(4, 0)]), acc_t(saved[x.gate(4, 1)]), acc_t(saved[x.gate(4, 2)]),
                      acc_t(saved[x.gate(4, 3)])};
    acc_t dxr, dxz, dxn, dhn;
    acc_t dhp = gru_backward(acc_t(dh[idx]), a, acc_t(h_prev[idx]), dxr, dxz, dxn, dhn);
    dxg[x.gate(3, 0)] = scalar_t(dxr);
    dxg[x.gate(3, 1)] = scalar_t(dxz);
    dxg[x.gate(3, 2)] = scalar_t(dxn);
    dhg[x.gate(3, 0)] = scalar_t(dxr);
    dhg[x.gate(3, 1)] = scalar_t(dxz);
    dhg[x.gate(3, 2)] = scalar_t(dhn);
    dh_prev[idx] = scalar_t(dhp);
  }
};

// nothing saved beyond h itself
template <Act A, typename scalar_t, typename acc_t>
struct RNNStepFwd {
  const scalar_t *xg, *hg;
  scalar_t* h;
  RNNEXT_HD void operator()(int64_t idx) const {
    h[idx] = scalar_t(rnn_forward<A>(acc_t(xg[idx]) + acc_t(hg[idx])));
  }
};

template <Act A, typename scalar_t, typename acc_t>
struct RNNStepBwd {
  const scalar_t *dh, *h;
  scalar_t* dpre;
  RNNEXT_HD void operator()(int64_t idx) const {
    dpre[idx] = scalar_t(rnn_backward<A>(acc_t(dh[idx]), acc_t(h[idx])));
  }
};

}  // namespace cells
}  // namespace rnnext
