// Single-step cell ops (schemas in ops.cpp): one cells/step.h kernel on precomputed projections.
// xg, hg [B, G*H] (G = 4 LSTM, 3 GRU, 2 lecture's GRU, 1 RNN); states [B, H]; saved [B, S*H].
#pragma once
#include "driver/common.h"

namespace rnnext {

// Checks ref [B, G*H] (named ref_name), then each of `same` for ref's shape and each of `states`
// for [B, H]; returns H.
inline int64_t check_cell(const char* op, const char* ref_name, const Tensor& ref, int64_t G,
                          std::initializer_list<std::pair<const char*, const Tensor*>> same,
                          std::initializer_list<std::pair<const char*, const Tensor*>> states) {
  const Checks c{op, ref_name, ref};
  c.dims(ref, 2, G == 1 ? "[B, H]" : G == 2 ? "[B, 2*H]" : G == 3 ? "[B, 3*H]" : "[B, 4*H]");
  TORCH_CHECK(ref.size(1) % G == 0, op, ": ", ref_name, ".size(1) = ", ref.size(1), " is not a multiple of ", G);
  const int64_t H = ref.size(1) / G;
  for (auto [name, t] : same) c.shape(name, *t, ref.sizes());
  for (auto [name, t] : states) c.shape(name, *t, {ref.size(0), H});
  return H;
}

// One step of Cell on [B, H]: the generic forward functor over the op's tensors (states of the input type).
template <typename Cell, typename S>
using CellFwd = cells::Forward<Cell, S, at::opmath_type<S>, S>;
template <typename Cell, typename S>
using CellBwd = cells::Backward<Cell, S, at::opmath_type<S>, S>;

template <typename L>
std::tuple<Tensor, Tensor, Tensor> lstm_cell(const Tensor& xg, const Tensor& hg, const Tensor& cx) {
  const int64_t H = check_cell("lstm_cell", "xg", xg, 4, {{"hg", &hg}}, {{"cx", &cx}});
  auto x = xg.contiguous(), h = hg.contiguous(), c = cx.contiguous();
  auto hy = at::empty_like(c), cy = at::empty_like(c), saved = at::empty_like(x);
  RNNEXT_DISPATCH(xg.scalar_type(), "lstm_cell", [&] {
    using S = scalar_t;
    L::run(xg.device(), c.size(0), H,
           CellFwd<cells::LSTM, S>{.step = {nullptr, 0, H}, .xg = cptr<S>(x), .hg = cptr<S>(h),
                                   .st_prev = cptr<S>(c), .st = mptr<S>(cy), .y = mptr<S>(hy), .saved = mptr<S>(saved),
                                   .plane = c.numel()});
  });
  return {hy, cy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor> lstm_cell_backward(const Tensor& dhy, const Tensor& dcy, const Tensor& cx,
                                              const Tensor& cy, const Tensor& saved) {
  const int64_t H = check_cell("lstm_cell_backward", "saved", saved, 4, {},
                               {{"dhy", &dhy}, {"dcy", &dcy}, {"cx", &cx}, {"cy", &cy}});
  auto dh = dhy.contiguous(), c0 = cx.contiguous(), s = saved.contiguous();
  auto dgates = at::empty_like(s), dcx = dcy.clone(at::MemoryFormat::Contiguous);
  RNNEXT_DISPATCH(cx.scalar_type(), "lstm_cell_backward", [&] {
    using S = scalar_t;
    L::run(cx.device(), c0.size(0), H,
           CellBwd<cells::LSTM, S>{.step = {nullptr, 0, H}, .dh_next = cptr<S>(dh), .saved = cptr<S>(s),
                                   .st_prev = cptr<S>(c0), .dst = mptr<S>(dcx), .dxg = mptr<S>(dgates),
                                   .dhg = mptr<S>(dgates), .ldg = 4 * H, .plane = c0.numel()});
  });
  return {dgates, dcx};
}

template <typename L>
std::tuple<Tensor, Tensor> gru_cell(const Tensor& xg, const Tensor& hg, const Tensor& hx) {
  const int64_t H = check_cell("gru_cell", "xg", xg, 3, {{"hg", &hg}}, {{"hx", &hx}});
  auto x = xg.contiguous(), h = hg.contiguous(), h0 = hx.contiguous();
  auto hy = at::empty_like(h0), saved = at::empty({h0.size(0), 4 * H}, h0.options());
  RNNEXT_DISPATCH(xg.scalar_type(), "gru_cell", [&] {
    using S = scalar_t;
    L::run(xg.device(), h0.size(0), H,
           CellFwd<cells::GRU, S>{.step = {nullptr, 0, H}, .xg = cptr<S>(x), .hg = cptr<S>(h),
                                  .h_prev = cptr<S>(h0), .y = mptr<S>(hy), .saved = mptr<S>(saved)});
  });
  return {hy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& dhy, const Tensor& hx, const Tensor& saved) {
  const int64_t H = check_cell("gru_cell_backward", "saved", saved, 4, {}, {{"dhy", &dhy}, {"hx", &hx}});
  auto dh = dhy.contiguous(), h0 = hx.contiguous(), s = saved.contiguous();
  const int64_t B = h0.size(0);
  auto dxg = at::empty({B, 3 * H}, h0.options()), dhg = at::empty({B, 3 * H}, h0.options()),
       dhx = at::empty_like(h0);
  RNNEXT_DISPATCH(hx.scalar_type(), "gru_cell_backward", [&] {
    using S = scalar_t;
    L::run(hx.device(), B, H,
           CellBwd<cells::GRU, S>{.step = {nullptr, 0, H}, .dh_next = cptr<S>(dh), .saved = cptr<S>(s),
                                  .h_prev = cptr<S>(h0), .dxg = mptr<S>(dxg), .dhg = mptr<S>(dhg),
                                  .direct = mptr<S>(dhx), .ldg = 3 * H});
  });
  return {dxg, dhg, dhx};
}

template <typename L>
Tensor rnn_cell(const Tensor& xg, const Tensor& hg, std::string_view nonlinearity) {
  const int64_t H = check_cell("rnn_cell", "xg", xg, 1, {{"hg", &hg}}, {});
  auto x = xg.contiguous(), h = hg.contiguous();
  auto hy = at::empty_like(x);
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(xg.scalar_type(), "rnn_cell", [&] {
      using S = scalar_t;
      L::run(xg.device(), x.size(0), H,
             CellFwd<cells::RNN<decltype(act)::value>, S>{.step = {nullptr, 0, H}, .xg = cptr<S>(x),
                                                          .hg = cptr<S>(h), .y = mptr<S>(hy)});
    });
  });
  return hy;
}

template <typename L>
Tensor rnn_cell_backward(const Tensor& dhy, const Tensor& hy, std::string_view nonlinearity) {
  const int64_t H = check_cell("rnn_cell_backward", "hy", hy, 1, {{"dhy", &dhy}}, {});
  auto dh = dhy.contiguous(), h = hy.contiguous();
  auto dpre = at::empty_like(h);
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(hy.scalar_type(), "rnn_cell_backward", [&] {
      using S = scalar_t;
      L::run(hy.device(), h.size(0), H,
             CellBwd<cells::RNN<decltype(act)::value>, S>{.step = {nullptr, 0, H}, .dh_next = cptr<S>(dh),
                                                          .out = cptr<S>(h), .dxg = mptr<S>(dpre),
                                                          .dhg = mptr<S>(dpre), .ldg = H});
    });
  });
  return dpre;
}

template <typename L>
std::tuple<Tensor, Tensor> mgru_cell(const Tensor& xg, const Tensor& hg, const Tensor& hx) {
  const int64_t H = check_cell("mgru_cell", "xg", xg, 2, {{"hg", &hg}}, {{"hx", &hx}});
  auto x = xg.contiguous(), h = hg.contiguous(), h0 = hx.contiguous();
  auto hy = at::empty_like(h0), saved = at::empty_like(x);
  RNNEXT_DISPATCH(xg.scalar_type(), "mgru_cell", [&] {
    using S = scalar_t;
    L::run(xg.device(), h0.size(0), H,
           CellFwd<cells::MinimalGRU, S>{.step = {nullptr, 0, H}, .xg = cptr<S>(x), .hg = cptr<S>(h),
                                         .h_prev = cptr<S>(h0), .y = mptr<S>(hy), .saved = mptr<S>(saved)});
  });
  return {hy, saved};
}

template <typename L>
std::tuple<Tensor, Tensor> mgru_cell_backward(const Tensor& dhy, const Tensor& hx, const Tensor& saved) {
  const int64_t H = check_cell("mgru_cell_backward", "saved", saved, 2, {}, {{"dhy", &dhy}, {"hx", &hx}});
  auto dh = dhy.contiguous(), h0 = hx.contiguous(), s = saved.contiguous();
  auto dgates = at::empty_like(s), dhx = at::empty_like(h0);
  RNNEXT_DISPATCH(hx.scalar_type(), "mgru_cell_backward", [&] {
    using S = scalar_t;
    L::run(hx.device(), h0.size(0), H,
           CellBwd<cells::MinimalGRU, S>{.step = {nullptr, 0, H}, .dh_next = cptr<S>(dh), .saved = cptr<S>(s),
                                         .h_prev = cptr<S>(h0), .dxg = mptr<S>(dgates), .dhg = mptr<S>(dgates),
                                         .direct = mptr<S>(dhx), .ldg = 2 * H});
  });
  return {dgates, dhx};
}

}  // namespace rnnext
