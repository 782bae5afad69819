// The time loops of one layer-direction, the input projection and the weight gradients. Each launcher
// (cpu/launcher.h, cuda/kernels.cu) provides
//   static void gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add);
//       out = add + a @ b (add undefined: 0; may be out itself), 2-D, out contiguous; b a matrix, or what
//       right_operand or step_weights made of one
//   static Tensor contiguous(const Tensor& m);
//       m.contiguous() (the CPU's is faster for a transposed float matrix)
//   static Tensor right_operand(const Tensor& m);
//       m [K, N] in the layout gemm reads fastest as its right operand b: a weight or its transpose, once per
//       sequence, and a chunk's gate gradients that two GEMMs read (the CPU packs float ones in panels of 32
//       columns, 16-bit ones for AMX)
//   static int64_t gate_stride(int64_t GH, at::ScalarType);
//       the row stride of backward's gate-gradient buffers [steps, B, GH], the right operand of the weight
//       gradients' GEMMs (the CPU pads float rows of a multiple of 4 KB: rows 4 KB apart share L1 sets)
//   static Tensor step_weights(const Tensor& w_t, int64_t G, int64_t H, int64_t B);
//       w_t [K, G*H] (w_hh^T, a transposed view; backward: w_hh, G = 1) in the layout the fused steps want, or
//       (steps run one by one) gemm's right operand, contiguous, once per sequence
//   template <bool Rows, typename S, typename MakeF>
//   static void gemm_cell_steps(int64_t t0, int64_t t1, Tensor& hg, const Tensor& h, const Tensor& other,
//                               const Tensor& w_step, int64_t H, int64_t head, const MakeF& make_f);
//       forward steps t0..t1-1, each: hg = prev @ w_hh^T (columns: G gate blocks of H; w_hh block-diagonal
//       with heads of `head` units where head < H: a launcher may skip the zero blocks), then the cell functor
//       make_f(t, prev, next) over [B, H] (Rows: over whole rows, cells/layernorm.h); the state alternates
//       between h (read at even steps) and other (the CPU runs the steps in one parallel region)
//   template <bool Rows, typename S, typename MakeF>
//   static void cell_gemm_steps(int64_t t0, int64_t t1, Tensor& dh, const Tensor& dhg, const Tensor& direct,
//                               const Tensor& w_step, int64_t H, int64_t head, bool to_h0, const MakeF& make_f);
//       backward steps t1-1 down to t0, each: the cell functor make_f(t) (reads dh, writes dhg[t - t0]), then
//       dh = direct + dhg[t - t0] @ w_hh (direct undefined: 0), but at step 0 only where to_h0 (dh0 asked
//       for); w_step = step_weights(w_hh, 1, H, B)
//   (gemm_cell_each_step, cell_gemm_each_step below do them step by step: head-wise, a batched GEMM over the heads)
//   static int64_t chunk_steps(int64_t B, int64_t GH, int64_t elem);
//       steps of the input projection (and of its gradient) held at once: the CPU a few, so that they stay
//       in cache and [T, B, G*H] is never allocated; CUDA all of them (one GEMM)
//   static bool wants_persistent(Path);
//       whether this path runs the persistent kernel where it fits: use_persistent(path, the device's default)
//   template <typename F> static void run(c10::Device, int64_t B, int64_t H, const F& f);
//       f.apply(b, j) for every row b and hidden unit j
//   template <typename F> static void run_rows(c10::Device, int64_t B, const F& f);
//       f.row(b, executor) for every row: the layer-normalised cells (cells/layernorm.h)
// and may run a whole sequence itself (the persistent CUDA kernel; its CPU emulation for tests), with the
// projection of every step at hand, returning false where it did not:
//   template <typename Cell, typename S, typename A>
//   static bool persistent_forward(Path, const cells::SeqFwd<S, A>&, const Tensor& w_hh, int64_t head, Tensor& h);
//   static bool persistent_backward(Path, const cells::SeqBwd<S, A>&, const Tensor& w_hh, int64_t head, Tensor& dh);
//   (w_hh dense, head: the units per head of a block-diagonal one, else H)
// Otherwise the per-step loop: per step one GEMM into a preallocated buffer and one launch of the cell.
#pragma once
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>

#include <algorithm>

#include "cells/seq_args.h"
#include "driver/common.h"

namespace rnnext {

enum class Path : int64_t { Auto = 0, Step = 1, Persistent = 2 };

// The persistent kernel runs where it is asked for, or by default where it is the device's default: never
// when the per-step path is asked for.
inline bool use_persistent(Path path, bool by_default) {
  return path == Path::Persistent || (path == Path::Auto && by_default);
}

// out = add + a @ b through ATen (cuBLAS, MKL): what a launcher's gemm does where it has nothing better.
inline void aten_gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add) {
  if (add.defined())
    at::addmm_out(out, add, a, b);
  else
    at::mm_out(out, a, b);
}

// Steps [t0, t1) of a contiguous time-major [T, B, F] tensor as a [(t1 - t0) * B, F] matrix.
inline Tensor steps(const Tensor& t, int64_t t0, int64_t t1) {
  return t.narrow(0, t0, t1 - t0).view({(t1 - t0) * t.size(1), t.size(2)});
}

// A step's cell over [B, H]: per element, or (Rows) per whole row.
template <typename L, bool Rows, typename F>
void run_cell(c10::Device device, int64_t B, int64_t H, const F& f) {
  if constexpr (Rows)
    L::run_rows(device, B, f);
  else
    L::run(device, B, H, f);
}

// The per-step GEMMs of a block-diagonal w_hh (k heads of D units, G gates) batched over the heads: each head's
// diagonal blocks gathered once per sequence, all its gates side by side (forward: w_hh^T's, [k, D, G*D]; backward:
// w_hh's, [k, G*D, D]); per step one batched GEMM between copies from and to the gate-major [B, G*H] layout
// (ATen ops: the same code on every device).
struct HeadSteps {
  int64_t G, k, D;
  Tensor w, in, out;  // the heads' weights; the step's head-major operand and product (scratch)

  // w_t = the dense w_hh^T [H, G*H]
  static HeadSteps forward(const Tensor& w_t, int64_t H, int64_t D, int64_t B) {
    const int64_t G = w_t.size(1) / H, k = H / D;
    auto w = w_t.reshape({k, D, G, k, D}).diagonal(0, 0, 3).permute({3, 0, 1, 2}).reshape({k, D, G * D});
    return {G, k, D, w, Tensor(), at::empty({k, B, G * D}, w_t.options())};
  }
  // w = the dense w_hh [G*H, H]
  static HeadSteps backward(const Tensor& w, int64_t H, int64_t D, int64_t B) {
    const int64_t G = w.size(0) / H, k = H / D;
    auto wb = w.reshape({G, k, D, k, D}).diagonal(0, 1, 3).permute({3, 0, 1, 2}).reshape({k, G * D, D});
    return {G, k, D, wb, at::empty({k, B, G * D}, w.options()), at::empty({k, B, D}, w.options())};
  }
  // hg [B, G*H] = prev [B, H] @ w_hh^T
  void forward_step(Tensor& hg, const Tensor& prev) {
    const int64_t B = prev.size(0);
    at::bmm_out(out, prev.view({B, k, D}).transpose(0, 1), w);
    hg.view({B, G, k, D}).copy_(out.view({k, B, G, D}).permute({1, 2, 0, 3}));
  }
  // dh [B, H] = direct (undefined: 0) + dg [B, G*H] @ w_hh
  void backward_step(Tensor& dh, const Tensor& dg, const Tensor& direct) {
    const int64_t B = dh.size(0);
    in.view({k, B, G, D}).copy_(dg.view({B, G, k, D}).permute({2, 0, 1, 3}));
    at::bmm_out(out, in, w);
    auto dh3 = dh.view({B, k, D});
    if (direct.defined())
      at::add_out(dh3, direct.view({B, k, D}), out.transpose(0, 1));
    else
      dh3.copy_(out.transpose(0, 1));
  }
};

// gemm_cell_steps and cell_gemm_steps one step at a time: a GEMM and a cell launch per step. Head-wise (head < H)
// with a plain matrix w (not a launcher's packed one): HeadSteps.
template <typename L, bool Rows, typename MakeF>
void gemm_cell_each_step(int64_t t0, int64_t t1, Tensor& hg, const Tensor& h, const Tensor& other, const Tensor& w_t,
                         int64_t H, int64_t head, const MakeF& make_f) {
  const bool batched = head < H && w_t.dim() == 2;
  auto heads = batched ? HeadSteps::forward(w_t, H, head, h.size(0)) : HeadSteps{};
  for (int64_t t = t0; t < t1; ++t) {
    const Tensor& prev = t % 2 ? other : h;
    if (batched)
      heads.forward_step(hg, prev);
    else
      L::gemm(hg, prev, w_t, Tensor());
    run_cell<L, Rows>(hg.device(), h.size(0), H, make_f(t, prev, t % 2 ? h : other));
  }
}
template <typename L, bool Rows, typename MakeF>
void cell_gemm_each_step(int64_t t0, int64_t t1, Tensor& dh, const Tensor& dhg, const Tensor& direct,
                         const Tensor& w_hh, int64_t H, int64_t head, bool to_h0, const MakeF& make_f) {
  const bool batched = head < H && w_hh.dim() == 2;
  auto heads = batched ? HeadSteps::backward(w_hh, H, head, dh.size(0)) : HeadSteps{};
  for (int64_t t = t1 - 1; t >= t0; --t) {
    run_cell<L, Rows>(dh.device(), dh.size(0), H, make_f(t));
    if (t == 0 && !to_h0) continue;
    auto dg = dhg[t - t0];
    if (batched)
      heads.backward_step(dh, dg, direct);
    else
      L::gemm(dh, dg, w_hh, direct);
  }
}

// What a forward reads and writes (contiguous; w_hr, r undefined without a projection). h: the carried
// state, h0 on entry, h_n on exit. w_hh dense; head: the units per head of a block-diagonal one (else H).
struct FwdTensors {
  Tensor x, w_ih, b_ih, b_hh, w_hh, w_hr, lengths, y, h, s_all, saved, r;
  int64_t head;
};

// Which gradients a backward computes (its output_mask), in the order of the forward's tensor inputs.
struct Needs {
  bool x, w_ih, w_hh, b_ih, b_hh, h0, s0, params, w_hr;
};

// What a backward reads and writes. dh: the carried gradient of the state, dhn on entry, dh0 on exit;
// direct [B, P] or undefined (see cells/seq_args.h); the weight gradients are accumulated transposed
// (dw^T = operand^T @ dgates: the operand a row-major GEMM has to transpose is the smaller one), those not
// needed undefined; db_ih holds the hidden bias's gradient too where the cell's hg shares xg's.
struct BwdTensors {
  Tensor dy, y, h0, saved, w_hh, x, w_ih, lengths, dh, direct, dx, dw_ih_t, dw_hh_t, db_ih, db_hh;
  Needs need;
  int64_t head;  // as FwdTensors': with heads, only dw_hh_t's diagonal blocks are computed
};

template <typename L, typename Cell, typename S, typename A>
void forward(Path path, cells::SeqFwd<S, A> p, FwdTensors& f) {
  const int64_t GH = Cell::G * p.H;
  // one_launch: the persistent kernel may run every step in one launch, so xg holds them all
  const bool proj = f.w_hr.defined(), one_launch = !Cell::rows && L::wants_persistent(path) && !proj;
  const int64_t chunk = one_launch ? p.T : std::clamp<int64_t>(L::chunk_steps(p.B, GH, sizeof(S)), 1, p.T);
  const auto opts = f.y.options();
  auto xg = at::empty({chunk, p.B, GH}, opts);
  const auto w_ih_t = L::right_operand(f.w_ih.t());
  auto project = [&](int64_t t0, int64_t t1) {  // xg = x @ w_ih^T for steps [t0, t1)
    RECORD_FUNCTION("rnnext::fwd_project", std::vector<c10::IValue>());
    auto out = steps(xg, 0, t1 - t0);
    L::gemm(out, steps(f.x, t0, t1), w_ih_t, Tensor());
    p.xg = cptr<S>(xg);
    p.t0 = t0;
  };
  if constexpr (!Cell::rows) {
    if (one_launch) {
      project(0, p.T);
      if (L::template persistent_forward<Cell>(path, p, f.w_hh, f.head, f.h)) return;
    }
  }
  const auto device = f.h.device();
  auto hg = at::empty({p.B, GH}, opts);
  // With projection the steps' GEMMs are gemm's; without, step_weights lays w_hh^T out (the CPU's fused steps
  // read a layout of their own)
  const auto w_t = proj ? L::right_operand(f.w_hh.t()) : Tensor();
  const auto wr_t = proj ? L::right_operand(f.w_hr.t()) : Tensor();
  auto hp = proj ? at::empty({p.B, p.P}, opts) : Tensor();
  // Without projection the state lives in two buffers: a fused step's cell writes h_t while other
  // threads' GEMM still reads h_{t-1}.
  auto other = proj ? Tensor() : at::empty_like(f.h);
  const auto w_step = proj ? Tensor() : L::step_weights(f.w_hh.t(), Cell::G, p.H, p.B);
  for (int64_t t0 = 0; t0 < p.T; t0 += chunk) {
    const int64_t t1 = std::min(p.T, t0 + chunk);
    if (!one_launch) project(t0, t1);
    if (!proj) {
      RECORD_FUNCTION("rnnext::fwd_steps", std::vector<c10::IValue>());
      L::template gemm_cell_steps<Cell::rows, S>(
          t0, t1, hg, f.h, other, w_step, p.H, f.head, [&](int64_t t, const Tensor& prev, const Tensor& next) {
            return cells::forward_step<Cell>(p, t, cptr<S>(hg), cptr<S>(prev), mptr<S>(next));
          });
    } else {
      for (int64_t t = t0; t < t1; ++t) {  // LSTM with projection: the cell, the projection GEMM, the carry
        L::gemm(hg, f.h, w_t, Tensor());
        run_cell<L, Cell::rows>(device, p.B, p.H,
                                cells::forward_step<Cell>(p, t, cptr<S>(hg), cptr<S>(f.h), mptr<S>(f.h)));
        L::gemm(hp, f.r[t], wr_t, Tensor());
        L::run(device, p.B, p.P,
               cells::CarryFwd<S, A>{
                   .step = {p.lengths, t, p.P}, .hp = cptr<S>(hp), .h = mptr<S>(f.h), .y = p.y + t * p.B * p.P});
      }
    }
  }
  if (!proj && p.T % 2) f.h.copy_(other);
}

// w_hr, dhp [T, B, P]: the LSTM projection (undefined without).
template <typename L, typename Cell, typename S, typename A>
void backward(Path path, cells::SeqBwd<S, A> p, BwdTensors& b, const Tensor& w_hr, const Tensor& dhp) {
  const int64_t GH = Cell::G * p.H;
  const bool proj = w_hr.defined(), one_launch = !Cell::rows && L::wants_persistent(path) && !proj;
  const int64_t chunk = one_launch ? p.T : std::clamp<int64_t>(L::chunk_steps(p.B, GH, sizeof(S)), 1, p.T);
  const auto opts = b.y.options();
  p.ldg = one_launch ? GH : L::gate_stride(GH, b.y.scalar_type());  // the persistent kernels read rows GH apart
  auto gate_buffer = [&] { return at::empty({chunk, p.B, p.ldg}, opts).narrow(2, 0, GH); };
  auto dxg = gate_buffer();
  auto dhg = Cell::separate_hg ? gate_buffer() : dxg;
  p.dxg = mptr<S>(dxg);
  p.dhg = mptr<S>(dhg);
  // dy as given where it is contiguous, else a chunk at a time (y.sum()'s is an expanded scalar: a
  // contiguous copy would be a [T, B, P] tensor of ones)
  if (one_launch) b.dy = b.dy.contiguous();
  auto dy_chunk = b.dy.is_contiguous() ? Tensor() : at::empty({chunk, p.B, p.P}, opts);
  auto hold = [&](int64_t t0, int64_t t1) {  // the chunk [t0, t1) of dy, dxg, dhg
    p.t0 = t0;
    if (!dy_chunk.defined()) {
      p.dy = cptr<S>(b.dy) + t0 * p.B * p.P;
      return;
    }
    dy_chunk.narrow(0, 0, t1 - t0).copy_(b.dy.narrow(0, t0, t1 - t0));
    p.dy = cptr<S>(dy_chunk);
  };
  // From the chunk of steps [t0, t1): dx of those steps, and their part of the weight and bias gradients
  // (those asked for).
  const Needs& need = b.need;
  // dw_hh^T += hs^T @ dg (hs [n, P] the states before the steps, dg [n, G*H] their gate gradients); head-wise,
  // per head and gate block: the off-diagonal blocks would be thrown away
  auto add_dw_hh = [&](const Tensor& hs, const Tensor& dg) {
    if (b.head == p.H) return L::gemm(b.dw_hh_t, hs.t(), dg, b.dw_hh_t);
    const auto hs_t = L::contiguous(hs.t());
    for (int64_t k0 = 0; k0 < p.H; k0 += b.head)
      for (int64_t g = 0; g < Cell::G; ++g) {
        auto out = b.dw_hh_t.narrow(0, k0, b.head).narrow(1, g * p.H + k0, b.head);
        L::gemm(out, hs_t.narrow(0, k0, b.head), dg.narrow(1, g * p.H + k0, b.head), out);
      }
  };
  const auto w_ih = need.x ? L::right_operand(b.w_ih) : Tensor();  // dx's right operand
  auto gradients = [&](int64_t t0, int64_t t1) {
    RECORD_FUNCTION("rnnext::bwd_gradients", std::vector<c10::IValue>());
    const auto dxg_c = steps(dxg, 0, t1 - t0), dhg_c = steps(dhg, 0, t1 - t0);
    if (need.x) {
      auto dx = steps(b.dx, t0, t1);
      L::gemm(dx, dxg_c, w_ih, Tensor());
    }
    int64_t s0 = t0;  // the state before step t: h0 at t = 0 (its own GEMM: not a row of y), else y[t - 1]
    if (need.w_hh && t0 == 0) {
      add_dw_hh(b.h0, dhg[0]);
      s0 = 1;
    }
    // Where dhg is dxg and both weight gradients read all of it, their right operand is laid out once
    const bool shared = !Cell::separate_hg && need.w_ih && need.w_hh && b.head == p.H && s0 == t0;
    const auto dg = shared ? L::right_operand(dxg_c) : dxg_c;
    if (need.w_ih) L::gemm(b.dw_ih_t, steps(b.x, t0, t1).t(), dg, b.dw_ih_t);
    if (need.w_hh && t1 > s0) add_dw_hh(steps(b.y, s0 - 1, t1 - 1), shared ? dg : steps(dhg, s0 - t0, t1 - t0));
    Tensor db;  // without separate_hg both biases' gradients are this one sum
    if (b.db_ih.defined()) b.db_ih.add_(db = dxg_c.sum(0));
    if (b.db_hh.defined()) b.db_hh.add_(Cell::separate_hg || !db.defined() ? dhg_c.sum(0) : db);
  };
  if constexpr (!Cell::rows) {
    if (one_launch) {
      hold(0, p.T);
      if (L::template persistent_backward<Cell>(path, p, b.w_hh, b.head, b.dh)) {
        gradients(0, p.T);
        return;
      }
    }
  }
  const auto device = b.dh.device();
  auto dr = proj ? at::empty({p.B, p.H}, opts) : Tensor();
  const auto w_step = proj ? L::right_operand(b.w_hh) : L::step_weights(b.w_hh, 1, p.H, p.B);
  const auto wr = proj ? L::right_operand(w_hr) : Tensor();
  for (int64_t t1 = p.T; t1 > 0; t1 -= chunk) {
    const int64_t t0 = std::max<int64_t>(0, t1 - chunk);
    hold(t0, t1);
    if (!proj) {
      RECORD_FUNCTION("rnnext::bwd_steps", std::vector<c10::IValue>());
      L::template cell_gemm_steps<Cell::rows, S>(
          t0, t1, b.dh, dhg, b.direct, w_step, p.H, b.head, need.h0,
          [&](int64_t t) { return cells::backward_step<Cell>(p, t, cptr<S>(b.dh), false); });
    } else {
      for (int64_t t = t1 - 1; t >= t0; --t) {  // LSTM with projection: the carry, the projection GEMM, the cell
        L::run(device, p.B, p.P,
               cells::CarryBwd<S, A>{.step = {p.lengths, t, p.P},
                                     .dh_next = cptr<S>(b.dh),
                                     .dy = p.dy + cells::in_chunk(p, t) * p.B * p.P,
                                     .dhp = mptr<S>(dhp) + t * p.B * p.P,
                                     .direct = p.direct,
                                     .clip = p.clip});
        L::gemm(dr, dhp[t], wr, Tensor());
        run_cell<L, Cell::rows>(device, p.B, p.H, cells::backward_step<Cell>(p, t, cptr<S>(dr), true));
        if (t > 0 || need.h0) L::gemm(b.dh, dhg[t - t0], w_step, b.direct);  // dh_prev = direct + dgates @ w_hh
      }
    }
    gradients(t0, t1);
  }
}

}  // namespace rnnext
