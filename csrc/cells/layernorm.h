// Layer norm's math for the layer-normalised cells (cells/layernorm_lstm.h, layernorm_gru.h): row cells
// (cells/rows.h), written once over a row executor E.
// LN(v) = (v - mean(v)) / sqrt(var(v) + eps) * w + b over the row's features (biased variance).
// Saved for backward per row: the normalised values (before w, b) as the cell's saved values, and the
// reciprocal standard deviations as its stats. Backward adds each row's part of the norms' weight and bias
// gradients into that row's sums over the steps (dparam [B, N*H], laid out as the saved values; a row is the
// same thread's or block's at every step, so no two writers meet), which the driver adds over the rows once.
#pragma once
#include "cells/rows.h"

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
  const A var = e.template sums<A, 1>(n,
                                      [&]<typename V>(int64_t k, V* s) {
                                        const V d = at_<V>(pre, k) - V(mean);
                                        s[0] = s[0] + d * d;
                                      })
                    .v[0] /
                A(n);
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

// A row's sums of its norms' weight and bias gradients at feature k: d the gradient of the norm's output
// (dw, db null: not asked for).
template <typename V, typename A>
RNNEXT_HD void add_ln_grads(A* dw, A* db, int64_t k, V d, V xhat) {
  if (!dw) return;
  Lanes<V>::store(dw + k, Lanes<V>::load(dw + k) + d * xhat);
  Lanes<V>::store(db + k, Lanes<V>::load(db + k) + d);
}

}  // namespace cells
}  // namespace rnnext
