// Cells that need whole rows (rows = true: layer norm reduces over a row's features): one row (one sequence
// of the batch) per call, written once over a row executor E, which the CPU runs with one thread per row,
// in vectors (cpu/launcher.h VecRow), and CUDA with one block per row (cuda/kernels.cu BlockRow):
//   e.template loop<A>(n, fn)   fn.template operator()<V>(k) for k < n, V a vector of A at k..k+lanes or
//                               A itself, the work shared by E's threads
//   e.template sums<A, M>(n, fn)   fn.template operator()<V>(k, acc) for k < n as loop does, adding into
//                               its M accumulators V acc[M]; their totals over k and E's threads, to all of
//                               them (a barrier: loops before are done); one horizontal sum per row, not
//                               per vector
// A row cell has the element cells' traits (cells/step.h) and
//   STATS       values per row and step saved for backward, in the math type (layer norm: 1/std)
//   PARAMS, PARAM_UNITS   its parameters (at most 2), PARAM_UNITS*H values each (layer norm: weight, bias)
//   WORK_FORWARD, WORK_BACKWARD   scratch per row, in units of H, of the math type
//   forward_row(f, r, e), backward_row(f, r, e)   row r within its sequence, f the functor below
// What is written once here: past a sequence's end (the states carry over, the outputs, saved values and
// stats are 0; backward: the gate gradients are 0 and the state gradients pass through).
#pragma once
#include "cells/step.h"

namespace rnnext {
namespace cells {

constexpr int kMaxParams = 2;

// A cell's row-cell traits, 0 for element cells.
template <typename Cell, bool = Cell::rows>
struct RowTraits {
  static constexpr int stats = 0, params = 0, param_units = 0, work_forward = 0, work_backward = 0;
};
template <typename Cell>
struct RowTraits<Cell, true> {
  static constexpr int stats = Cell::STATS, params = Cell::PARAMS, param_units = Cell::PARAM_UNITS,
                       work_forward = Cell::WORK_FORWARD, work_backward = Cell::WORK_BACKWARD;
};

// Pointers as Forward's (cells/step.h), plus the cell's parameters, eps, stats [B, STATS], work.
template <typename Cell, typename scalar_t, typename acc_t>
struct RowForward {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *h_prev;
  const acc_t* st_prev;
  scalar_t* h;
  acc_t* st;
  scalar_t *st_out, *y, *saved;
  acc_t* stats;
  const scalar_t* param[kMaxParams];
  acc_t eps;
  Keep<scalar_t, acc_t> keep;
  acc_t* work;
  int64_t plane;

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    if (step.active(r)) return Cell::forward_row(*this, r, e);
    const int64_t H = step.H, s0 = r * H;
    e.template loop<acc_t>(H, [&]<typename V>(int64_t j) {
      using L = Lanes<V>;
      L::store(h + s0 + j, L::load(h_prev + s0 + j));
      for (int z = 1; z < Cell::Z; ++z) {
        L::store(st + (z - 1) * plane + s0 + j, L::load(st_prev + (z - 1) * plane + s0 + j));
        if (st_out) L::store(st_out + (z - 1) * plane + s0 + j, V(0));
      }
      L::store(y + s0 + j, V(0));
    });
    if (saved)
      e.template loop<acc_t>(Cell::SAVED * H,
                             [&]<typename V>(int64_t k) { Lanes<V>::store(saved + Cell::SAVED * s0 + k, V(0)); });
    if (stats)
      e.template loop<acc_t>(1, [&]<typename V>(int64_t) {
        for (int k = 0; k < Cell::STATS; ++k) stats[Cell::STATS * r + k] = acc_t(0);
      });
  }
};

// Pointers as Backward's (cells/step.h), plus the parameters, stats, work, and dparam [B, PARAM_UNITS*H] in/out:
// each row's sums over the steps of the parameters' gradients (null: not asked for).
template <typename Cell, typename scalar_t, typename acc_t>
struct RowBackward {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy, *saved, *h_prev, *st_prev;
  const acc_t* stats;
  acc_t* dst;
  scalar_t *dxg, *dhg, *direct;
  acc_t clip;
  Keep<scalar_t, acc_t> keep;
  int64_t ldg, plane;
  const scalar_t* param[kMaxParams];
  acc_t* work;
  acc_t* dparam[kMaxParams];

  template <typename E>
  RNNEXT_HD void row(int64_t r, const E& e) const {
    if (step.active(r)) return Cell::backward_row(*this, r, e);
    const int64_t H = step.H, g0 = r * ldg;
    e.template loop<acc_t>(Cell::G * H, [&]<typename V>(int64_t k) {
      Lanes<V>::store(dxg + g0 + k, V(0));
      if (Cell::separate_hg) Lanes<V>::store(dhg + g0 + k, V(0));
    });
    if (direct)
      e.template loop<acc_t>(
          H, [&]<typename V>(int64_t j) { Lanes<V>::store(direct + r * H + j, Lanes<V>::load(dh_next + r * H + j)); });
  }
};

}  // namespace cells
}  // namespace rnnext
