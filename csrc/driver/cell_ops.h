// Host side of the single-step cell ops: argument checks, allocation, dtype dispatch. Device-agnostic;
// a Launcher (cpu/kernels.cpp, cuda/kernels.cu) runs a cells/step.h functor over n elements:
//   template <typename F> static void run(c10::Device device, int64_t n, const F& f);
// Shapes: xg, hg [B, G*H] (G = 4 LSTM, 3 GRU, 1 RNN); states [B, H]; saved [B, 4*H].
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "cells/step.h"

namespace rnnext {

using at::Tensor;

#define RNNEXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_same(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but xg is on ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but xg has dtype ", like.scalar_type());
}

// Checks xg/hg/state shapes for a G-gate cell; returns H.
inline int64_t check_step(const char* op, int64_t G, const Tensor& xg, const Tensor& hg, const Tensor& state) {
  TORCH_CHECK(xg.dim() == 2, op, ": expected xg of shape [B, ", G, "*H], got ", xg.sizes());
  TORCH_CHECK(at::isFloatingType(xg.scalar_type()), op, ": expected a floating point xg, got ", xg.scalar_type());
  TORCH_CHECK(xg.size(1) % G == 0, op, ": xg.size(1) = ", xg.size(1), " is not a multiple of ", G);
  const int64_t H = xg.size(1) / G;
  TORCH_CHECK(hg.sizes() == xg.sizes(), op, ": hg must have xg's shape ", xg.sizes(), ", got ", hg.sizes());
  TORCH_CHECK(state.dim() == 2 && state.size(0) == xg.size(0) && state.size(1) == H, op,
              ": expected a state of shape [", xg.size(0), ", ", H, "], got ", state.sizes());
  check_same(op, "hg", hg, xg);
  check_same(op, "state", state, xg);
  return H;
}

inline void check_like(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(), ", got ", t.sizes());
  check_same(op, name, t, like);
}

inline cells::Act parse_act(std::string_view nonlinearity) {
  if (nonlinearity == "tanh") return cells::Act::Tanh;
  TORCH_CHECK(nonlinearity == "relu", "Unknown nonlinearity: ", nonlinearity);
  return cells::Act::Relu;
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> lstm_cell(const Tensor& xg, const Tensor& hg, const Tensor& cx) {
  const int64_t H = check_step("lstm_cell", 4, xg, hg, cx);
  auto x = xg.contiguous(), h = hg.contiguous(), c = cx.contiguous();
  auto hy = at::empty_like(c), cy = at::empty_like(c), saved = at::empty_like(x);
  RNNEXT_DISPATCH(xg.scalar_type(), "lstm_cell", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    L::run(xg.device(), c.numel(),
           cells::LSTMStepFwd<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                               c.const_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(),
                                               cy.mutable_data_ptr<scalar_t>(), saved.mutable_data_ptr<scalar_t>(), H});
  });
  return {hy, cy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor> lstm_cell_backward(const Tensor& dhy, const Tensor& dcy, const Tensor& cx,
                                              const Tensor& cy, const Tensor& saved) {
  const char* op = "lstm_cell_backward";
  TORCH_CHECK(saved.dim() == 2 && saved.size(1) % 4 == 0, op, ": saved must be [B, 4*H], got ", saved.sizes());
  check_step(op, 4, saved, saved, cx);
  check_like(op, "dhy", dhy, cx);
  check_like(op, "dcy", dcy, cx);
  check_like(op, "cy", cy, cx);
  auto dh = dhy.contiguous(), dc = dcy.contiguous(), c0 = cx.contiguous(), c1 = cy.contiguous(),
       s = saved.contiguous();
  auto dgates = at::empty_like(s), dcx = at::empty_like(c0);
  RNNEXT_DISPATCH(cx.scalar_type(), "lstm_cell_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    L::run(cx.device(), c0.numel(),
           cells::LSTMStepBwd<scalar_t, acc_t>{dh.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(),
                                               c0.const_data_ptr<scalar_t>(), c1.const_data_ptr<scalar_t>(),
                                               s.const_data_ptr<scalar_t>(), dgates.mutable_data_ptr<scalar_t>(),
                                               dcx.mutable_data_ptr<scalar_t>(), c0.size(1)});
  });
  return {dgates, dcx};
}

template <typename L>
std::tuple<Tensor, Tensor> gru_cell(const Tensor& xg, const Tensor& hg, const Tensor& hx) {
  const int64_t H = check_step("gru_cell", 3, xg, hg, hx);
  auto x = xg.contiguous(), h = hg.contiguous(), h0 = hx.contiguous();
  auto hy = at::empty_like(h0), saved = at::empty({h0.size(0), 4 * H}, h0.options());
  RNNEXT_DISPATCH(xg.scalar_type(), "gru_cell", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    L::run(xg.device(), h0.numel(),
           cells::GRUStepFwd<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                              h0.const_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(),
                                              saved.mutable_data_ptr<scalar_t>(), H});
  });
  return {hy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& dhy, const Tensor& hx, const Tensor& saved) {
  const char* op = "gru_cell_backward";
  TORCH_CHECK(saved.dim() == 2 && saved.size(1) % 4 == 0, op, ": saved must be [B, 4*H], got ", saved.sizes());
  check_step(op, 4, saved, saved, hx);
  check_like(op, "dhy", dhy, hx);
  auto dh = dhy.contiguous(), h0 = hx.contiguous(), s = saved.contiguous();
  const int64_t B = h0.size(0), H = h0.size(1);
  auto dxg = at::empty({B, 3 * H}, h0.options()), dhg = at::empty({B, 3 * H}, h0.options()),
       dhx = at::empty_like(h0);
  RNNEXT_DISPATCH(hx.scalar_type(), "gru_cell_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    L::run(hx.device(), h0.numel(),
           cells::GRUStepBwd<scalar_t, acc_t>{dh.const_data_ptr<scalar_t>(), h0.const_data_ptr<scalar_t>(),
                                              s.const_data_ptr<scalar_t>(), dxg.mutable_data_ptr<scalar_t>(),
                                              dhg.mutable_data_ptr<scalar_t>(), dhx.mutable_data_ptr<scalar_t>(), H});
  });
  return {dxg, dhg, dhx};
}

template <typename L, cells::Act A>
void rnn_step(const Tensor& xg, const Tensor& hg, Tensor& hy) {
  RNNEXT_DISPATCH(xg.scalar_type(), "rnn_cell", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    L::run(xg.device(), hy.numel(),
           cells::RNNStepFwd<A, scalar_t, acc_t>{xg.const_data_ptr<scalar_t>(), hg.const_data_ptr<scalar_t>(),
                                                 hy.mutable_data_ptr<scalar_t>()});
  });
}

template <typename L>
Tensor rnn_cell(const Tensor& xg, const Tensor& hg, std::string_view nonlinearity) {
  check_step("rnn_cell", 1, xg, hg, xg);
  auto x = xg.contiguous(), h = hg.contiguous();
  auto hy = at::empty_like(x);
  if (parse_act(nonlinearity) == cells::Act::Tanh)
    rnn_step<L, cells::Act::Tanh>(x, h, hy);
  else
    rnn_step<L, cells::Act::Relu>(x, h, hy);
  return hy;
}

template <typename L, cells::Act A>
void rnn_step_backward(const Tensor& dhy, const Tensor& hy, Tensor& dpre) {
  RNNEXT_DISPATCH(hy.scalar_type(), "rnn_cell_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    L::run(hy.device(), hy.numel(),
           cells::RNNStepBwd<A, scalar_t, acc_t>{dhy.const_data_ptr<scalar_t>(), hy.const_data_ptr<scalar_t>(),
                                                 dpre.mutable_data_ptr<scalar_t>()});
  });
}

template <typename L>
Tensor rnn_cell_backward(const Tensor& dhy, const Tensor& hy, std::string_view nonlinearity) {
  const char* op = "rnn_cell_backward";
  check_step(op, 1, hy, hy, hy);
  check_like(op, "dhy", dhy, hy);
  auto dh = dhy.contiguous(), h = hy.contiguous();
  auto dpre = at::empty_like(h);
  if (parse_act(nonlinearity) == cells::Act::Tanh)
    rnn_step_backward<L, cells::Act::Tanh>(dh, h, dpre);
  else
    rnn_step_backward<L, cells::Act::Relu>(dh, h, dpre);
  return dpre;
}

// The same kernels for every device: one list, registered by each device's file.
template <typename L>
void register_cell_ops(torch::Library& m) {
  m.impl("lstm_cell", &lstm_cell<L>);
  m.impl("lstm_cell_backward", &lstm_cell_backward<L>);
  m.impl("gru_cell", &gru_cell<L>);
  m.impl("gru_cell_backward", &gru_cell_backward<L>);
  m.impl("rnn_cell", &rnn_cell<L>);
  m.impl("rnn_cell_backward", &rnn_cell_backward<L>);
}

}  // namespace rnnext
