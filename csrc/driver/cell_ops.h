// Single-step cell ops (schemas in ops.cpp): one cells/step.h kernel on precomputed projections.
// xg, hg [B, G*H] (G = 4 LSTM, 3 GRU, 1 RNN); states [B, H]; saved [B, 4*H].
#pragma once
#include "driver/common.h"

namespace rnnext {

// Checks xg/hg against a [B, H] state for a G-gate cell; returns H.
inline int64_t check_cell(const char* op, int64_t G, const Tensor& xg, const Tensor& hg, const Tensor& state) {
  TORCH_CHECK(xg.dim() == 2, op, ": expected xg of shape [B, ", G, "*H], got ", xg.sizes());
  TORCH_CHECK(at::isFloatingType(xg.scalar_type()), op, ": expected a floating point xg, got ", xg.scalar_type());
  TORCH_CHECK(xg.size(1) % G == 0, op, ": xg.size(1) = ", xg.size(1), " is not a multiple of ", G);
  const int64_t H = xg.size(1) / G;
  check_shape(op, "hg", hg, xg.sizes(), xg);
  check_shape(op, "state", state, {xg.size(0), H}, xg);
  return H;
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> lstm_cell(const Tensor& xg, const Tensor& hg, const Tensor& cx) {
  const int64_t H = check_cell("lstm_cell", 4, xg, hg, cx);
  auto x = xg.contiguous(), h = hg.contiguous(), c = cx.contiguous();
  auto hy = at::empty_like(c), cy = at::empty_like(c), saved = at::empty_like(x);
  RNNEXT_DISPATCH(xg.scalar_type(), "lstm_cell", [&] {
    cells::LSTMFwd<scalar_t, at::opmath_type<scalar_t>> f{
        {nullptr, 0, H},     cptr<scalar_t>(x),  cptr<scalar_t>(h), nullptr, nullptr, cptr<scalar_t>(c), nullptr,
        mptr<scalar_t>(cy), nullptr,            nullptr,           mptr<scalar_t>(hy), mptr<scalar_t>(saved)};
    L::run(xg.device(), c.size(0), H, f);
  });
  return {hy, cy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor> lstm_cell_backward(const Tensor& dhy, const Tensor& dcy, const Tensor& cx,
                                              const Tensor& cy, const Tensor& saved) {
  const char* op = "lstm_cell_backward";
  const int64_t H = check_cell(op, 4, saved, saved, cx);
  for (auto [name, t] : {std::pair{"dhy", &dhy}, {"dcy", &dcy}, {"cy", &cy}}) check_shape(op, name, *t, cx.sizes(), cx);
  auto dh = dhy.contiguous(), c0 = cx.contiguous(), c1 = cy.contiguous(), s = saved.contiguous();
  auto dgates = at::empty_like(s), dcx = dcy.clone(at::MemoryFormat::Contiguous);
  RNNEXT_DISPATCH(cx.scalar_type(), "lstm_cell_backward", [&] {
    cells::LSTMBwd<scalar_t, at::opmath_type<scalar_t>> f{
        {nullptr, 0, H},     cptr<scalar_t>(dh),     nullptr, cptr<scalar_t>(s), cptr<scalar_t>(c0), cptr<scalar_t>(c1),
        mptr<scalar_t>(dcx), mptr<scalar_t>(dgates), nullptr};
    L::run(cx.device(), c0.size(0), H, f);
  });
  return {dgates, dcx};
}

template <typename L>
std::tuple<Tensor, Tensor> gru_cell(const Tensor& xg, const Tensor& hg, const Tensor& hx) {
  const int64_t H = check_cell("gru_cell", 3, xg, hg, hx);
  auto x = xg.contiguous(), h = hg.contiguous(), h0 = hx.contiguous();
  auto hy = at::empty_like(h0), saved = at::empty({h0.size(0), 4 * H}, h0.options());
  RNNEXT_DISPATCH(xg.scalar_type(), "gru_cell", [&] {
    cells::GRUFwd<scalar_t, at::opmath_type<scalar_t>> f{
        {nullptr, 0, H}, cptr<scalar_t>(x), cptr<scalar_t>(h), nullptr, nullptr, cptr<scalar_t>(h0), nullptr,
        mptr<scalar_t>(hy), mptr<scalar_t>(saved)};
    L::run(xg.device(), h0.size(0), H, f);
  });
  return {hy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& dhy, const Tensor& hx, const Tensor& saved) {
  const char* op = "gru_cell_backward";
  const int64_t H = check_cell(op, 4, saved, saved, hx);
  check_shape(op, "dhy", dhy, hx.sizes(), hx);
  auto dh = dhy.contiguous(), h0 = hx.contiguous(), s = saved.contiguous();
  const int64_t B = h0.size(0);
  auto dxg = at::empty({B, 3 * H}, h0.options()), dhg = at::empty({B, 3 * H}, h0.options()),
       dhx = at::empty_like(h0);
  RNNEXT_DISPATCH(hx.scalar_type(), "gru_cell_backward", [&] {
    cells::GRUBwd<scalar_t, at::opmath_type<scalar_t>> f{
        {nullptr, 0, H}, cptr<scalar_t>(dh), nullptr, cptr<scalar_t>(s), cptr<scalar_t>(h0), mptr<scalar_t>(dxg),
        mptr<scalar_t>(dhg), mptr<scalar_t>(dhx)};
    L::run(hx.device(), B, H, f);
  });
  return {dxg, dhg, dhx};
}

template <typename L>
Tensor rnn_cell(const Tensor& xg, const Tensor& hg, std::string_view nonlinearity) {
  const int64_t H = check_cell("rnn_cell", 1, xg, hg, xg);
  auto x = xg.contiguous(), h = hg.contiguous();
  auto hy = at::empty_like(x);
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(xg.scalar_type(), "rnn_cell", [&] {
      cells::RNNFwd<decltype(act)::value, scalar_t, at::opmath_type<scalar_t>> f{
          {nullptr, 0, H}, cptr<scalar_t>(x), cptr<scalar_t>(h), nullptr, nullptr, nullptr, nullptr, mptr<scalar_t>(hy)};
      L::run(xg.device(), x.size(0), H, f);
    });
  });
  return hy;
}

template <typename L>
Tensor rnn_cell_backward(const Tensor& dhy, const Tensor& hy, std::string_view nonlinearity) {
  const char* op = "rnn_cell_backward";
  const int64_t H = check_cell(op, 1, hy, hy, hy);
  check_shape(op, "dhy", dhy, hy.sizes(), hy);
  auto dh = dhy.contiguous(), h = hy.contiguous();
  auto dpre = at::empty_like(h);
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(hy.scalar_type(), "rnn_cell_backward", [&] {
      cells::RNNBwd<decltype(act)::value, scalar_t, at::opmath_type<scalar_t>> f{
          {nullptr, 0, H}, cptr<scalar_t>(dh), nullptr, cptr<scalar_t>(h), mptr<scalar_t>(dpre), nullptr};
      L::run(hy.device(), h.size(0), H, f);
    });
  });
  return dpre;
}

template <typename L>
std::tuple<Tensor, Tensor> mgru_cell(const Tensor& xg, const Tensor& hg, const Tensor& hx) {
  const int64_t H = check_cell("mgru_cell", 2, xg, hg, hx);
  auto x = xg.contiguous(), h = hg.contiguous(), h0 = hx.contiguous();
  auto hy = at::empty_like(h0), saved = at::empty_like(x);
  RNNEXT_DISPATCH(xg.scalar_type(), "mgru_cell", [&] {
    cells::MGRUFwd<scalar_t, at::opmath_type<scalar_t>> f{
        {nullptr, 0, H}, cptr<scalar_t>(x), cptr<scalar_t>(h), nullptr, nullptr, cptr<scalar_t>(h0), nullptr,
        mptr<scalar_t>(hy), mptr<scalar_t>(saved)};
    L::run(xg.device(), h0.size(0), H, f);
  });
  return {hy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor> mgru_cell_backward(const Tensor& dhy, const Tensor& hx, const Tensor& saved) {
  const char* op = "mgru_cell_backward";
  const int64_t H = check_cell(op, 2, saved, saved, hx);
  check_shape(op, "dhy", dhy, hx.sizes(), hx);
  auto dh = dhy.contiguous(), h0 = hx.contiguous(), s = saved.contiguous();
  auto dgates = at::empty_like(s), dhx = at::empty_like(h0);
  RNNEXT_DISPATCH(hx.scalar_type(), "mgru_cell_backward", [&] {
    cells::MGRUBwd<scalar_t, at::opmath_type<scalar_t>> f{
        {nullptr, 0, H}, cptr<scalar_t>(dh), nullptr, cptr<scalar_t>(s), cptr<scalar_t>(h0), mptr<scalar_t>(dgates),
        mptr<scalar_t>(dhx)};
    L::run(hx.device(), h0.size(0), H, f);
  });
  return {dgates, dhx};
}

}  // namespace rnnext
