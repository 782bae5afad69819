// One time step of a cell over a [B, H] grid: the body of every pointwise kernel, CPU and CUDA, for the
// single-step cell ops and for each step of the sequence driver alike. A cell (cells/lstm.h, gru.h, ...) is
// its math on values and its traits; what is written once here, for every cell: the loads and stores, the
// biases, variable lengths, zoneout and BPTT clipping.
//
// A cell is a struct with
//   name     its ops' names: torch.ops.rnnext.<name>_seq, ...
//   G        gate rows of w_ih and w_hh ([G*H, .]), SAVED values saved per unit and step for backward
//   Z        carried states per unit: h first (the step GEMM's operand), then the others (LSTM: c)
//   ZONED    how many of the first states zoneout applies to (0: none)
//   separate_hg   the hidden projection gets its own gradient (the GRU's b_hn sits inside r*(.))
//   reads_h_prev, reads_out   its math reads h before the step (forward and backward) / the new h (backward)
//   rows     it needs whole rows (layer norm: cells/rows.h); else it is computed unit by unit, here
//   proj     it takes proj_size (an LSTM's projection of h)
//   forward<V>(x[G], hp[G], prev[Z], next[Z], saved[SAVED])
//       x, hp: the input and hidden projections' pre-activations, biases included
//   backward<V>(saved[SAVED], prev[Z], out[Z], dnext[Z], dx[G], dhp[G], dprev[Z])
//       dnext: the gradients of next (before zoneout); dx, dhp: of x and hp (dhp written only where
//       separate_hg, else it equals dx); dprev: of prev, but for what flows through hp (the driver's GEMM)
//
// A launcher calls f.apply<V>(b, j) for every row b < B and column j < H, V being acc_t (one element)
// or a CPU vector (a segment of row b from j). Loads and stores are in scalar_t, the math in acc_t
// (float for half/bfloat16). Pointers point at this step's slices, contiguous, row-major:
//   xg, hg                 [B, G*H]       gate k of row b at b*G*H + k*H + j
//   dxg, dhg, dgates       [B, ldg]       the same with rows ldg >= G*H apart (the sequence driver's CPU
//                                         buffers pad rows of a multiple of 4 KB: driver/loops.h)
//   h_prev, h, y           [B, H]         state 0 before and after the step; the step's output
//   st_prev, st, dst       [Z-1, B, H]    the other states (acc_t) and their gradients, planes B*H apart
//   st_out                 [Z-1, B, H]    the other states after the step, kept for backward (scalar_t)
//   saved                  [B, SAVED*H]   value k of unit j at b*SAVED*H + k*H + j
// b_ih, b_hh [G*H] (nullable): added to xg and hg here, so that the GEMMs are plain mm (addmm first
// copies the broadcast bias into its output, which costs more than the add).
// saved and st_out may be null: a forward that no backward will follow (no_grad) skips those stores.
// State pointers may alias (h_prev == h, st_prev == st): each element is read before it is written, by
// the same thread. y is this step's output row (0 past a sequence's end); h, st the carried states.
// Variable lengths: a row with lengths[b] <= t is past its end: its states carry over unchanged,
// its output, saved values and gate gradients are 0, and the gradients of its states pass through
// unchanged (h's into "direct"). Backward reads the gradient of the new h as dh_next (from step t+1)
// plus, for rows within their length, dy (nullable: the gradient of the output y[t]), and writes to
// `direct` the part of the gradient of h_prev that does not go through hg (nullable where that part is
// known to be 0).
// Zoneout (Krueger et al. 2016): each unit of a zoned state keeps its previous value with weight k,
// s = k*s_prev + (1-k)*s~ (the cell's math sees s~, before zoneout): k from a mask [B, Z*H] (0/1 in
// training: part z for state z) or a constant p (eval).
// BPTT clipping (clip > 0): at every step within a sequence, the gradient of the h that step produced
// (from its output and from the next step, the sum above) is clamped to [-clip, clip] before it enters
// the step's backward (LSTM with projection: the projected h). The other states' gradients are not
// clipped. Past a sequence's end nothing is clipped.
#pragma once
#include "cells/common.h"

namespace rnnext {
namespace cells {

struct Step {
  const int64_t* lengths;  // [B] or nullptr (every row active)
  int64_t t, H;
  RNNEXT_HD bool active(int64_t b) const { return lengths == nullptr || t < lengths[b]; }
};

template <typename V, typename S>
RNNEXT_HD V load_sum(const S* a, const S* b_or_null, int64_t i) {
  V v = Lanes<V>::load(a + i);
  return b_or_null ? v + Lanes<V>::load(b_or_null + i) : v;
}

// The gradient of a step's new state: from the next step, plus from the output, clipped.
template <typename V, typename S, typename A>
RNNEXT_HD V state_grad(const S* dh_next, const S* dy, int64_t i, A clip) {
  V v = load_sum<V>(dh_next, dy, i);
  return clip > A(0) ? Lanes<V>::clamp(v, V(-clip), V(clip)) : v;
}

// Gate k of a [B, G*H] projection (xg or hg) in row b, column j, plus its bias.
template <typename V, typename S>
RNNEXT_HD V load_gate(const S* proj, const S* bias, int64_t G, int64_t H, int64_t b, int64_t j, int64_t k) {
  V v = Lanes<V>::load(proj + (b * G + k) * H + j);
  return bias ? v + Lanes<V>::load(bias + k * H + j) : v;
}

// v[0..n) to consecutive blocks H apart from p (a row's gates or saved values; planes of states).
template <typename V, typename S>
RNNEXT_HD void store_each(S* p, int64_t H, const V* v, int n) {
  for (int k = 0; k < n; ++k) Lanes<V>::store(p + k * H, v[k]);
}

// Zoneout's keep weights of one step (see above); off when mask is null and p is 0.
template <typename scalar_t, typename acc_t>
struct Keep {
  const scalar_t* mask;  // [B, Z*H] or null
  acc_t p;
  int64_t Z;
  RNNEXT_HD bool on() const { return mask != nullptr || p > acc_t(0); }
  // The N keep weights of unit j of row b into k; false (k untouched) where zoneout is off.
  template <int N, typename V>
  RNNEXT_HD bool values(int64_t b, int64_t j, int64_t H, V* k) const {
    if (!on()) return false;
    for (int z = 0; z < N; ++z) k[z] = mask ? Lanes<V>::load(mask + (b * Z + z) * H + j) : V(p);
    return true;
  }
};

// Zoneout of a step's first N states: next = k*prev + (1-k)*next.
template <int N, typename V>
RNNEXT_HD void zoneout_mix(const V* keep, const V* prev, V* next) {
  for (int z = 0; z < N; ++z) next[z] = keep[z] * prev[z] + (V(1) - keep[z]) * next[z];
}

// Its backward: of each zoned state's gradient, k goes straight to the previous state (kept), 1-k through
// the cell (dnext).
template <int N, typename V>
RNNEXT_HD void zoneout_split(const V* keep, V* dnext, V* kept) {
  for (int z = 0; z < N; ++z) {
    kept[z] = keep[z] * dnext[z];
    dnext[z] = (V(1) - keep[z]) * dnext[z];
  }
}

template <int N>
constexpr int at_least_one = N > 0 ? N : 1;

// The step of one unit on values, around which every kernel puts its loads and stores: the cell's math where
// the row is within its sequence (active), then, where zoned, zoneout of its zoned states with their keep
// weights; past a sequence's end the states carry over and the saved values are 0. Returns the output y.
template <typename Cell, typename V>
RNNEXT_HD V forward_unit(bool active, bool zoned, const V* keep, const V* x, const V* hp, const V* prev, V* next,
                         V* saved) {
  if (!active) {
    for (int z = 0; z < Cell::Z; ++z) next[z] = prev[z];
    for (int s = 0; s < Cell::SAVED; ++s) saved[s] = V(0);
    return V(0);
  }
  Cell::forward(x, hp, prev, next, saved);
  if (zoned) zoneout_mix<Cell::ZONED>(keep, prev, next);
  return next[0];
}

// Backward of forward_unit. dnext: the gradients of next (h's with dy and clipped where active); dprev: of
// prev, but for what flows through hp; dhp = dx unless Cell::separate_hg. Past a sequence's end the
// gradients pass through, and dx, dhp are 0.
template <typename Cell, typename V>
RNNEXT_HD void backward_unit(bool active, bool zoned, const V* keep, const V* saved, const V* prev, const V* out,
                             V* dnext, V* dx, V* dhp, V* dprev) {
  if (!active) {
    for (int g = 0; g < Cell::G; ++g) dx[g] = dhp[g] = V(0);
    for (int z = 0; z < Cell::Z; ++z) dprev[z] = dnext[z];
    return;
  }
  V kept[Cell::Z];
  for (int z = 0; z < Cell::Z; ++z) kept[z] = V(0);
  if (zoned) zoneout_split<Cell::ZONED>(keep, dnext, kept);
  Cell::backward(saved, prev, out, dnext, dx, dhp, dprev);
  if (!Cell::separate_hg)
    for (int g = 0; g < Cell::G; ++g) dhp[g] = dx[g];
  for (int z = 0; z < Cell::Z; ++z) dprev[z] = dprev[z] + kept[z];
}

// With proj_size (LSTM), y receives the cell output o*tanh(c) before the projection and h is null (the
// driver projects, then CarryFwd updates the state); h_prev is null then too (the LSTM does not read it).
// state_t: the type of the other carried states (acc_t in the sequence driver: 16-bit types would round
// them at every step; scalar_t in the single-step cell ops, whose states are tensors of the input type).
template <typename Cell, typename scalar_t, typename acc_t, typename state_t = acc_t>
struct Forward {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *xg, *hg, *b_ih, *b_hh, *h_prev;
  const state_t* st_prev;
  scalar_t* h;
  state_t* st;
  scalar_t *st_out, *y, *saved;
  Keep<scalar_t, acc_t> keep;
  int64_t plane;  // B*H: the distance of st's planes

  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    constexpr int G = Cell::G, Z = Cell::Z, K = Cell::SAVED;
    using L = Lanes<V>;
    const int64_t H = step.H, s = b * H + j;
    const bool active = step.active(b);
    V k[at_least_one<Cell::ZONED>];
    const bool zoned = Cell::ZONED > 0 && active && keep.template values<Cell::ZONED>(b, j, H, k);
    V prev[Z], next[Z], x[G], hp[G], sv[at_least_one<K>];
    prev[0] = h_prev && (Cell::reads_h_prev || zoned || !active) ? L::load(h_prev + s) : V(0);
    for (int z = 1; z < Z; ++z) prev[z] = L::load(st_prev + (z - 1) * plane + s);
    if (active)
      for (int g = 0; g < G; ++g) {
        x[g] = load_gate<V>(xg, b_ih, G, H, b, j, g);
        hp[g] = load_gate<V>(hg, b_hh, G, H, b, j, g);
      }
    const V out = forward_unit<Cell>(active, zoned, k, x, hp, prev, next, sv);
    if (h) L::store(h + s, next[0]);
    for (int z = 1; z < Z; ++z) L::store(st + (z - 1) * plane + s, next[z]);
    if (st_out)
      for (int z = 1; z < Z; ++z) L::store(st_out + (z - 1) * plane + s, active ? next[z] : V(0));
    L::store(y + s, out);
    if (saved) store_each(saved + b * K * H + j, H, sv, K);
  }
};

// dst [Z-1, B, H] in/out: the gradients of the other states, of the new ones on entry, of the previous ones
// on exit. With zoneout, direct (the share of dh_prev that skips the cell) must be given.
template <typename Cell, typename scalar_t, typename acc_t, typename state_t = acc_t>
struct Backward {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy, *saved, *h_prev, *st_prev, *out;
  state_t* dst;
  scalar_t *dxg, *dhg, *direct;  // dhg: separate_hg only
  acc_t clip;
  Keep<scalar_t, acc_t> keep;
  int64_t ldg, plane;

  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    constexpr int G = Cell::G, Z = Cell::Z, K = Cell::SAVED;
    using L = Lanes<V>;
    const int64_t H = step.H, s = b * H + j, d = b * ldg + j;
    const bool active = step.active(b);
    V k[at_least_one<Cell::ZONED>];
    const bool zoned = Cell::ZONED > 0 && active && keep.template values<Cell::ZONED>(b, j, H, k);
    V sv[at_least_one<K>], prev[Z], outs[Z], dnext[Z], dprev[Z], dx[G], dhp[G];
    dnext[0] = active ? state_grad<V>(dh_next, dy, s, clip) : L::load(dh_next + s);
    for (int z = 1; z < Z; ++z) dnext[z] = L::load(dst + (z - 1) * plane + s);
    if (active) {
      for (int i = 0; i < K; ++i) sv[i] = L::load(saved + b * K * H + i * H + j);
      prev[0] = Cell::reads_h_prev ? L::load(h_prev + s) : V(0);
      outs[0] = Cell::reads_out ? L::load(out + s) : V(0);
      for (int z = 1; z < Z; ++z) prev[z] = L::load(st_prev + (z - 1) * plane + s);
    }
    backward_unit<Cell>(active, zoned, k, sv, prev, outs, dnext, dx, dhp, dprev);
    store_each(dxg + d, H, dx, G);
    if (Cell::separate_hg) store_each(dhg + d, H, dhp, G);
    if (direct) L::store(direct + s, dprev[0]);
    for (int z = 1; z < Z; ++z) L::store(dst + (z - 1) * plane + s, dprev[z]);
  }
};

// LSTM proj_size, forward: the projected cell output hp becomes the state and the output; past a
// sequence's end the state stays and the output is 0.
template <typename scalar_t, typename acc_t>
struct CarryFwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t* hp;
  scalar_t *h, *y;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    if (!step.active(b)) {
      L::store(y + s, V(0));
      return;
    }
    V v = L::load(hp + s);
    L::store(h + s, v);
    L::store(y + s, v);
  }
};

// LSTM proj_size, backward: the gradient of the projected output (dhp) and the part carried past a
// sequence's end (direct).
template <typename scalar_t, typename acc_t>
struct CarryBwd {
  using scalar = scalar_t;
  using acc = acc_t;
  Step step;
  const scalar_t *dh_next, *dy;
  scalar_t *dhp, *direct;
  acc_t clip;
  template <typename V>
  RNNEXT_HD void apply(int64_t b, int64_t j) const {
    const int64_t H = step.H;
    using L = Lanes<V>;
    const int64_t s = b * H + j;
    const bool on = step.active(b);
    L::store(dhp + s, on ? state_grad<V>(dh_next, dy, s, clip) : V(0));
    if (direct) L::store(direct + s, on ? V(0) : L::load(dh_next + s));
  }
};

}  // namespace cells
}  // namespace rnnext
