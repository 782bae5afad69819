// The time loops of one layer-direction. Each launcher (cpu/kernels.cpp, cuda/kernels.cu) provides the
// per-step GEMM, out = add + a @ b (add undefined: 0), and the forward step, out = a @ b (columns: G
// gate blocks of H) followed by the cell functor f over [B, H] (the CPU fuses the two):
//   static void gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add);
//   template <typename F> static void gemm_cell(Tensor& out, const Tensor& a, const Tensor& b, int64_t G,
//                                               int64_t H, const F& f);
// and may run a whole sequence itself (the persistent CUDA kernel; its CPU emulation for tests):
//   template <typename Cell, typename S, typename A>
//   static bool persistent_forward(Path, const cells::SeqFwd<S, A>&, const Tensor& w_hh, Tensor& h);
//   static bool persistent_backward(Path, const cells::SeqBwd<S, A>&, const Tensor& w_hh, Tensor& dh);
// returning false where it did not; then the per-step loop below runs: per step one GEMM (ATen:
// MKL/oneDNN on CPU, cuBLAS on CUDA) into a preallocated buffer and one pointwise launch of the cell.
#pragma once
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "cells/seq.h"
#include "driver/common.h"

namespace rnnext {

enum class Path : int64_t { Auto = 0, Step = 1, Persistent = 2 };

// MKL packs a transposed right operand on every call; a contiguous [K, N] one it reads as is
// (measured: [32,256]x[256,1024] 85 us vs 120 us). Transposed once per sequence, used every step.
inline Tensor right_operand(const Tensor& w) { return w.t().contiguous(); }

// out = add + a @ b through ATen (cuBLAS, MKL): what a launcher's gemm does where it has nothing better.
inline void aten_gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add) {
  if (add.defined())
    at::addmm_out(out, add, a, b);
  else
    at::mm_out(out, a, b);
}

// h: the carried state [B, P], h0 on entry. w_hr, r: the LSTM projection (undefined without).
template <typename L, typename Cell, typename S, typename A>
void step_forward(const cells::SeqFwd<S, A>& p, Tensor& h, const Tensor& w_hh, const Tensor& w_hr, const Tensor& r) {
  const auto device = h.device();
  auto hg = at::empty({p.B, Cell::G * p.H}, h.options());
  auto w_t = right_operand(w_hh);
  if (w_hr.defined()) {  // LSTM with projection: the cell, then the projection GEMM, then the carry
    auto hp = at::empty({p.B, p.P}, h.options());
    auto wr_t = right_operand(w_hr);
    for (int64_t t = 0; t < p.T; ++t) {
      L::gemm(hg, h, w_t, Tensor());
      L::run(device, p.B, p.H, Cell::fwd(p, t, cptr<S>(hg), cptr<S>(h), mptr<S>(h)));
      L::gemm(hp, r[t], wr_t, Tensor());
      L::run(device, p.B, p.P,
             cells::CarryFwd<S, A>{.step = {p.lengths, t, p.P}, .hp = cptr<S>(hp), .h = mptr<S>(h),
                                   .y = p.y + t * p.B * p.P});
    }
    return;
  }
  // The state in two buffers: a fused step's cell writes h_t while other threads' GEMM reads h_{t-1}.
  auto other = at::empty_like(h);
  for (int64_t t = 0; t < p.T; ++t) {
    const Tensor& prev = t % 2 ? other : h;
    const Tensor& next = t % 2 ? h : other;
    L::gemm_cell(hg, prev, w_t, Cell::G, p.H, Cell::fwd(p, t, cptr<S>(hg), cptr<S>(prev), mptr<S>(next)));
  }
  if (p.T % 2) h.copy_(other);
}

// dh: the carried gradient of the state [B, P], dhn on entry; direct: p.direct's tensor (or undefined);
// dhg: p.dhg's; w_hr, dhp [T, B, P]: the LSTM projection (undefined without).
template <typename L, typename Cell, typename S, typename A>
void step_backward(const cells::SeqBwd<S, A>& p, Tensor& dh, const Tensor& direct, const Tensor& dhg,
                   const Tensor& w_hh, const Tensor& w_hr, const Tensor& dhp) {
  const auto device = dh.device();
  const bool proj = w_hr.defined();
  auto dr = proj ? at::empty({p.B, p.H}, dh.options()) : Tensor();
  for (int64_t t = p.T - 1; t >= 0; --t) {
    const S* dh_cell = cptr<S>(dh);
    if (proj) {
      L::run(device, p.B, p.P,
             cells::CarryBwd<S, A>{.step = {p.lengths, t, p.P}, .dh_next = cptr<S>(dh), .dy = p.dy + t * p.B * p.P,
                                   .dhp = mptr<S>(dhp) + t * p.B * p.P, .direct = p.direct, .clip = p.clip});
      L::gemm(dr, dhp[t], w_hr, Tensor());
      dh_cell = cptr<S>(dr);
    }
    L::run(device, p.B, p.H, Cell::bwd(p, t, dh_cell, proj));
    L::gemm(dh, dhg[t], w_hh, direct);  // dh_prev = direct + dgates @ w_hh
  }
}

// The forward of one layer-direction: the launcher's persistent kernel where it runs, else per step.
// Tensors contiguous; w_hr, r undefined without a projection.
template <typename L, typename Cell, typename S, typename A>
void forward(Path path, const cells::SeqFwd<S, A>& p, Tensor& h, const Tensor& w_hh, const Tensor& w_hr,
             const Tensor& r) {
  if (path != Path::Step && !w_hr.defined() && L::template persistent_forward<Cell>(path, p, w_hh, h)) return;
  step_forward<L, Cell>(p, h, w_hh, w_hr, r);
}

template <typename L, typename Cell, typename S, typename A, typename BwdTensors>
void backward(Path path, const cells::SeqBwd<S, A>& p, BwdTensors& b, const Tensor& w_hr, const Tensor& dhp) {
  if (path != Path::Step && !w_hr.defined() && L::template persistent_backward<Cell>(path, p, b.w_hh, b.dh)) return;
  step_backward<L, Cell>(p, b.dh, b.direct, b.dhg, b.w_hh, w_hr, dhp);
}

}  // namespace rnnext
