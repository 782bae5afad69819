// Sequence ops (schemas in ops.cpp): one layer-direction, the whole recurrence in C++.
// Per step: one GEMM hg = h @ w_hh^T into a preallocated buffer, one cells/step.h kernel (which adds
// the biases). Backward walks the steps in reverse, then computes dw_hh and db_hh with one GEMM over
// all steps. Nothing is allocated inside the step loops.
//
//   xg       [T, B, G*H]  input projection x @ w_ih^T (no bias), T >= 1, steps in order: the caller
//                         flips reverse directions (each sequence within its length)
//   h0       [B, P]       P = proj_size for LSTM with w_hr, else H;  c0 [B, H] (LSTM)
//   w_hh     [G*H, P]     b_ih, b_hh [G*H] (optional);  w_hr [P, H] (LSTM proj_size, optional)
//   lengths  [B] int64 on xg's device (optional): rows with lengths[b] <= t keep their state and
//                         output 0
//   y        [T, B, P]    outputs;  h_n [B, P], c_n [B, H] the final (carried) states; the cell state is
//                         carried in float for 16-bit types (the GEMM input h stays in the input type)
//   c_all    [T, B, H]    LSTM cell state after each step (0 past the end), for backward
//   saved    [T, B, 4*H]  activated gates for backward (LSTM i,f,g,o; GRU r,z,n,hn)
//   save     false: no backward will follow (no_grad); c_all and saved are then [0, B, .] and not written
//   r        [T, B, H]    LSTM with w_hr: cell outputs o*tanh(c) before the projection; else [0]
// Backward needs the state before each step only where the step is within its sequence, and there it
// equals the previous output: h_prev[t] = y[t-1] (h0 at t = 0), so the states are not saved.
#pragma once
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include "driver/common.h"

namespace rnnext {

struct Dims {
  int64_t T, B, H, P;
};

// Forward: xg [T, B, G*H] fixes T, B, H and the device and dtype of everything; w_hr fixes P.
inline Dims check_seq(const char* op, int64_t G, const Tensor& xg, const Tensor& h0, const Tensor* c0,
                      const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                      const OptTensor& lengths, double clip) {
  const Checks c{op, "xg", xg};
  c.dims(xg, 3, G == 1 ? "[T, B, H]" : G == 2 ? "[T, B, 2*H]" : G == 3 ? "[T, B, 3*H]" : "[T, B, 4*H]");
  TORCH_CHECK(xg.size(0) > 0, op, ": expected a sequence length larger than 0");
  TORCH_CHECK(xg.size(2) % G == 0, op, ": xg.size(2) = ", xg.size(2), " is not a multiple of ", G);
  const int64_t T = xg.size(0), B = xg.size(1), H = xg.size(2) / G;
  if (w_hr) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) > 0 && w_hr->size(1) == H, op, ": expected w_hr of shape [P, ", H,
                "] with P > 0, got ", w_hr->sizes());
    c.like("w_hr", *w_hr);
  }
  const int64_t P = w_hr ? w_hr->size(0) : H;
  c.shape("h0", h0, {B, P});
  if (c0) c.shape("c0", *c0, {B, H});
  c.shape("w_hh", w_hh, {G * H, P});
  if (b_ih) c.shape("b_ih", *b_ih, {G * H});
  if (b_hh) c.shape("b_hh", *b_hh, {G * H});
  c.lengths(lengths, B);
  c.clip(clip);
  return {T, B, H, P};
}

// Backward: y [T, B, P] (what forward returned) fixes T, B, P and the device and dtype; H = P, or
// for an LSTM with projection (w_hr [P, H], checked by the caller) w_hh [4*H, P] gives H. dy, dhn,
// h0 and w_hh are checked here, the cell's other tensors by the caller.
inline Dims check_seq_backward(const Checks& c, int64_t G, bool projected, const Tensor& dy, const Tensor& dhn,
                               const Tensor& y, const Tensor& h0, const Tensor& w_hh, const OptTensor& lengths,
                               double clip) {
  c.dims(y, 3, "[T, B, P]");
  TORCH_CHECK(y.size(0) > 0, c.op, ": expected a sequence length larger than 0");
  const int64_t P = y.size(2), H = projected && w_hh.dim() == 2 ? w_hh.size(0) / G : P;
  const Dims d{y.size(0), y.size(1), H, P};
  c.shape("w_hh", w_hh, {G * H, P});
  c.shape("dy", dy, {d.T, d.B, P});
  c.shape("dhn", dhn, {d.B, P});
  c.shape("h0", h0, {d.B, P});
  c.lengths(lengths, d.B);
  c.clip(clip);
  return d;
}

// What forward saved [T, B, S*H]; empty when forward ran with save=False.
inline void check_saved(const Checks& c, const Tensor& saved, int64_t S, const Dims& d) {
  TORCH_CHECK(!(saved.dim() == 3 && saved.size(0) == 0 && d.T > 0), c.op,
              ": saved is empty: the forward ran with save=False, which saves nothing for backward");
  c.shape("saved", saved, {d.T, d.B, S * d.H});
}

inline Tensor contiguous_or_undefined(const OptTensor& t) { return t ? t->contiguous() : Tensor(); }

// MKL packs a transposed right operand on every call; a contiguous [K, N] one it reads as is
// (measured: [32,256]x[256,1024] 85 us vs 120 us). Transposed once per sequence, used every step.
inline Tensor right_operand(const Tensor& w) { return w.t().contiguous(); }

// dh_prev = direct + dgates @ w_hh, where direct is defined
inline void step_gemm_backward(Tensor& dh_prev, const Tensor& direct, const Tensor& dgates, const Tensor& w_hh) {
  if (direct.defined())
    at::addmm_out(dh_prev, direct, dgates, w_hh);
  else
    at::mm_out(dh_prev, dgates, w_hh);
}

// dw_hh = sum over steps of dgates[t]^T @ h_prev[t] (h0, then y[t-1]): one GEMM for all steps
inline Tensor hh_weight_grad(const Tensor& dgates, const Tensor& h0, const Tensor& y, const Dims& d) {
  auto dw = at::mm(dgates[0].t(), h0);
  if (d.T > 1) {
    const int64_t n = (d.T - 1) * d.B;
    dw.addmm_(dgates.narrow(0, 1, d.T - 1).reshape({n, dgates.size(2)}).t(), y.narrow(0, 0, d.T - 1).reshape({n, d.P}));
  }
  return dw;
}

inline Tensor bias_grad(const Tensor& dgates) { return dgates.sum(at::IntArrayRef{0, 1}); }

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq(const Tensor& xg_, const Tensor& h0,
                                                                    const Tensor& c0, const Tensor& w_hh,
                                                                    const OptTensor& b_ih, const OptTensor& b_hh,
                                                                    const OptTensor& w_hr, const OptTensor& lengths_,
                                                                    double clip, bool save) {
  const Dims d = check_seq("lstm_seq", 4, xg_, h0, &c0, w_hh, b_ih, b_hh, w_hr, lengths_, clip);
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  auto xg = xg_.contiguous(), xb = contiguous_or_undefined(b_ih), hb = contiguous_or_undefined(b_hh);
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = xg.options();
  auto y = at::empty({T, B, P}, opts), c_all = at::empty({save ? T : 0, B, H}, opts),
       saved = at::empty({save ? T : 0, B, 4 * H}, opts), r = at::empty({w_hr ? T : 0, B, H}, opts),
       hg = at::empty({B, 4 * H}, opts);
  auto h = h0.clone(at::MemoryFormat::Contiguous);
  auto hp = w_hr ? at::empty({B, P}, opts) : Tensor();
  auto w_t = right_operand(w_hh), wr_t = w_hr ? right_operand(*w_hr) : Tensor();
  Tensor c;  // the carried cell state, in acc_t: 16-bit types would round it at every step
  RNNEXT_DISPATCH(xg.scalar_type(), "lstm_seq", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = scalar_t;
    c = c0.to(c10::CppTypeToScalarType<acc_t>::value, false, true, at::MemoryFormat::Contiguous);
    const int64_t* len = cptr<int64_t>(lengths);
    for (int64_t t = 0; t < T; ++t) {
      at::mm_out(hg, h, w_t);
      L::run(xg.device(), B, H,
             cells::LSTMFwd<S, acc_t, acc_t>{
                 .step = {len, t, H}, .xg = cptr<S>(xg) + t * B * 4 * H, .hg = cptr<S>(hg), .b_ih = cptr<S>(xb),
                 .b_hh = cptr<S>(hb), .c_prev = cptr<acc_t>(c), .h_prev = w_hr ? nullptr : cptr<S>(h),
                 .c = mptr<acc_t>(c), .c_out = save ? mptr<S>(c_all) + t * B * H : nullptr,
                 .h = w_hr ? nullptr : mptr<S>(h), .y = w_hr ? mptr<S>(r) + t * B * H : mptr<S>(y) + t * B * P,
                 .saved = save ? mptr<S>(saved) + t * B * 4 * H : nullptr});
      if (!w_hr) continue;
      at::mm_out(hp, r[t], wr_t);
      L::run(xg.device(), B, P,
             cells::CarryFwd<S, acc_t>{
                 .step = {len, t, P}, .hp = cptr<S>(hp), .h = mptr<S>(h), .y = mptr<S>(y) + t * B * P});
    }
  });
  return {y, h, c.to(xg.scalar_type()), c_all, saved, r};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq_backward(
    const Tensor& dy_, const Tensor& dhn, const Tensor& dcn, const Tensor& y_, const Tensor& h0, const Tensor& c0_,
    const Tensor& c_all, const Tensor& saved_, const Tensor& r_, const Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& lengths_, double clip) {
  const Checks ck{"lstm_seq_backward", "y", y_};
  const Dims d = check_seq_backward(ck, 4, w_hr.has_value(), dy_, dhn, y_, h0, w_hh, lengths_, clip);
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  if (w_hr) ck.shape("w_hr", *w_hr, {P, H});
  ck.shape("dcn", dcn, {B, H});
  ck.shape("c0", c0_, {B, H});
  ck.shape("c_all", c_all, {T, B, H});
  check_saved(ck, saved_, 4, d);
  if (w_hr) ck.shape("r", r_, {T, B, H});
  auto dy = dy_.contiguous(), y = y_.contiguous(), saved = saved_.contiguous(), cs = c_all.contiguous(),
       c0 = c0_.contiguous(), r = r_.contiguous(), w = w_hh.contiguous(), wr = w_hr ? w_hr->contiguous() : Tensor();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = y.options();
  auto dxg = at::empty({T, B, 4 * H}, opts);
  auto dh = dhn.clone(at::MemoryFormat::Contiguous);
  auto direct = lengths.defined() ? at::empty({B, P}, opts) : Tensor();
  auto dhp = w_hr ? at::empty({T, B, P}, opts) : Tensor(), dr = w_hr ? at::empty({B, H}, opts) : Tensor();
  Tensor dc;  // carried across steps like c: in acc_t
  RNNEXT_DISPATCH(y.scalar_type(), "lstm_seq_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = scalar_t;
    dc = dcn.to(c10::CppTypeToScalarType<acc_t>::value, false, true, at::MemoryFormat::Contiguous);
    const int64_t* len = cptr<int64_t>(lengths);
    for (int64_t t = T - 1; t >= 0; --t) {
      const S* dh_cell = cptr<S>(dh);
      const S* dy_t = cptr<S>(dy) + t * B * P;
      S* dir = mptr<S>(direct);
      if (w_hr) {
        L::run(y.device(), B, P,
               cells::CarryBwd<S, acc_t>{.step = {len, t, P}, .dh_next = dh_cell, .dy = dy_t,
                                         .dhp = mptr<S>(dhp) + t * B * P, .direct = dir, .clip = acc_t(clip)});
        at::mm_out(dr, dhp[t], wr);
        dh_cell = cptr<S>(dr);
        dy_t = nullptr;
        dir = nullptr;
      }
      L::run(y.device(), B, H,
             cells::LSTMBwd<S, acc_t, acc_t>{
                 .step = {len, t, H}, .dh_next = dh_cell, .dy = dy_t, .saved = cptr<S>(saved) + t * B * 4 * H,
                 .c_prev = t ? cptr<S>(cs) + (t - 1) * B * H : cptr<S>(c0), .c = cptr<S>(cs) + t * B * H,
                 .dc = mptr<acc_t>(dc), .dgates = mptr<S>(dxg) + t * B * 4 * H, .direct = dir,
                 .clip = acc_t(w_hr ? 0 : clip)});
      step_gemm_backward(dh, direct, dxg[t], w);
    }
  });
  auto db = bias_grad(dxg);
  auto dw_hr = w_hr ? at::mm(dhp.reshape({T * B, P}).t(), r.reshape({T * B, H})) : at::empty({0}, opts);
  return {dxg, dh, dc.to(y.scalar_type()), hh_weight_grad(dxg, h0, y, d), db.clone(), db, dw_hr};
}

// Forward of a single-state cell with G gate rows that saves S values per element (GRU: 3, 4;
// the lecture's GRU: 2, 2); Fwd is its cells/step.h functor.
template <typename L, template <typename, typename> class Fwd, int G, int S_>
std::tuple<Tensor, Tensor, Tensor> gated_seq(const char* op, const Tensor& xg_, const Tensor& h0, const Tensor& w_hh,
                                             const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths_,
                                             double clip, bool save) {
  const Dims d = check_seq(op, G, xg_, h0, nullptr, w_hh, b_ih, b_hh, std::nullopt, lengths_, clip);
  const int64_t T = d.T, B = d.B, H = d.H;
  auto xg = xg_.contiguous(), xb = contiguous_or_undefined(b_ih), hb = contiguous_or_undefined(b_hh);
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = xg.options();
  auto y = at::empty({T, B, H}, opts), saved = at::empty({save ? T : 0, B, S_ * H}, opts),
       hg = at::empty({B, G * H}, opts);
  auto h = h0.clone(at::MemoryFormat::Contiguous);
  auto w_t = right_operand(w_hh);
  RNNEXT_DISPATCH(xg.scalar_type(), "gated_seq", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = scalar_t;
    const int64_t* len = cptr<int64_t>(lengths);
    for (int64_t t = 0; t < T; ++t) {
      at::mm_out(hg, h, w_t);
      L::run(xg.device(), B, H,
             Fwd<S, acc_t>{.step = {len, t, H}, .xg = cptr<S>(xg) + t * B * G * H, .hg = cptr<S>(hg),
                           .b_ih = cptr<S>(xb), .b_hh = cptr<S>(hb), .h_prev = cptr<S>(h), .h = mptr<S>(h),
                           .y = mptr<S>(y) + t * B * H, .saved = save ? mptr<S>(saved) + t * B * S_ * H : nullptr});
    }
  });
  return {y, h, saved};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> gru_seq(const Tensor& xg, const Tensor& h0, const Tensor& w_hh,
                                           const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                                           double clip, bool save) {
  return gated_seq<L, cells::GRUFwd, 3, 4>("gru_seq", xg, h0, w_hh, b_ih, b_hh, lengths, clip, save);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> mgru_seq(const Tensor& xg, const Tensor& h0, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                                            double clip, bool save) {
  return gated_seq<L, cells::MGRUFwd, 2, 2>("mgru_seq", xg, h0, w_hh, b_ih, b_hh, lengths, clip, save);
}

// Backward of gated_seq; Bwd is its cells/step.h functor. The GRU writes the gradients of xg and hg
// separately (b_hn sits inside r*(.)); the lecture's GRU sums them before the cell: one gradient.
template <typename L, template <typename, typename> class Bwd, int G, int S_>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_seq_backward(const char* op, const Tensor& dy_,
                                                                      const Tensor& dhn, const Tensor& y_,
                                                                      const Tensor& h0_, const Tensor& saved_,
                                                                      const Tensor& w_hh, const OptTensor& lengths_,
                                                                      double clip) {
  constexpr bool gru = std::is_same_v<Bwd<float, float>, cells::GRUBwd<float, float>>;
  const Checks ck{op, "y", y_};
  const Dims d = check_seq_backward(ck, G, false, dy_, dhn, y_, h0_, w_hh, lengths_, clip);
  check_saved(ck, saved_, S_, d);
  const int64_t T = d.T, B = d.B, H = d.H;
  auto dy = dy_.contiguous(), y = y_.contiguous(), saved = saved_.contiguous(), h0 = h0_.contiguous(),
       w = w_hh.contiguous();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = y.options();
  auto dxg = at::empty({T, B, G * H}, opts), direct = at::empty({B, H}, opts);
  auto dhg = gru ? at::empty({T, B, G * H}, opts) : dxg;
  auto dh = dhn.clone(at::MemoryFormat::Contiguous);
  RNNEXT_DISPATCH(y.scalar_type(), "gated_seq_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = scalar_t;
    const int64_t* len = cptr<int64_t>(lengths);
    for (int64_t t = T - 1; t >= 0; --t) {
      const cells::Step step{len, t, H};
      const S *dh_t = cptr<S>(dh), *dy_t = cptr<S>(dy) + t * B * H, *saved_t = cptr<S>(saved) + t * B * S_ * H,
              *h_prev = t ? cptr<S>(y) + (t - 1) * B * H : cptr<S>(h0);
      S* dxg_t = mptr<S>(dxg) + t * B * G * H;
      if constexpr (gru)
        L::run(y.device(), B, H,
               Bwd<S, acc_t>{.step = step, .dh_next = dh_t, .dy = dy_t, .saved = saved_t, .h_prev = h_prev,
                             .dxg = dxg_t, .dhg = mptr<S>(dhg) + t * B * G * H, .direct = mptr<S>(direct),
                             .clip = acc_t(clip)});
      else
        L::run(y.device(), B, H,
               Bwd<S, acc_t>{.step = step, .dh_next = dh_t, .dy = dy_t, .saved = saved_t, .h_prev = h_prev,
                             .dgates = dxg_t, .direct = mptr<S>(direct), .clip = acc_t(clip)});
      step_gemm_backward(dh, direct, dhg[t], w);
    }
  });
  auto db_ih = bias_grad(dxg);
  return {dxg, dh, hh_weight_grad(dhg, h0, y, d), db_ih, gru ? bias_grad(dhg) : db_ih.clone()};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_seq_backward(const Tensor& dy, const Tensor& dhn,
                                                                    const Tensor& y, const Tensor& h0,
                                                                    const Tensor& saved, const Tensor& w_hh,
                                                                    const OptTensor& lengths, double clip) {
  return gated_seq_backward<L, cells::GRUBwd, 3, 4>("gru_seq_backward", dy, dhn, y, h0, saved, w_hh, lengths, clip);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mgru_seq_backward(const Tensor& dy, const Tensor& dhn,
                                                                     const Tensor& y, const Tensor& h0,
                                                                     const Tensor& saved, const Tensor& w_hh,
                                                                     const OptTensor& lengths, double clip) {
  return gated_seq_backward<L, cells::MGRUBwd, 2, 2>("mgru_seq_backward", dy, dhn, y, h0, saved, w_hh, lengths,
                                                     clip);
}

template <typename L>
std::tuple<Tensor, Tensor> rnn_seq(const Tensor& xg_, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_ih,
                                   const OptTensor& b_hh, const OptTensor& lengths_, std::string_view nonlinearity,
                                   double clip) {
  const Dims d = check_seq("rnn_seq", 1, xg_, h0, nullptr, w_hh, b_ih, b_hh, std::nullopt, lengths_, clip);
  const int64_t T = d.T, B = d.B, H = d.H;
  auto xg = xg_.contiguous(), xb = contiguous_or_undefined(b_ih), hb = contiguous_or_undefined(b_hh);
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = xg.options();
  auto y = at::empty({T, B, H}, opts), hg = at::empty({B, H}, opts);
  auto h = h0.clone(at::MemoryFormat::Contiguous);
  auto w_t = right_operand(w_hh);
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(xg.scalar_type(), "rnn_seq", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using S = scalar_t;
      const int64_t* len = cptr<int64_t>(lengths);
      for (int64_t t = 0; t < T; ++t) {
        at::mm_out(hg, h, w_t);
        L::run(xg.device(), B, H,
               cells::RNNFwd<decltype(act)::value, S, acc_t>{
                   .step = {len, t, H}, .xg = cptr<S>(xg) + t * B * H, .hg = cptr<S>(hg), .b_ih = cptr<S>(xb),
                   .b_hh = cptr<S>(hb), .h_prev = cptr<S>(h), .h = mptr<S>(h), .y = mptr<S>(y) + t * B * H});
      }
    });
  });
  return {y, h};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_seq_backward(const Tensor& dy_, const Tensor& dhn,
                                                                    const Tensor& y_, const Tensor& h0,
                                                                    const Tensor& w_hh, const OptTensor& lengths_,
                                                                    std::string_view nonlinearity, double clip) {
  const Checks ck{"rnn_seq_backward", "y", y_};
  const Dims d = check_seq_backward(ck, 1, false, dy_, dhn, y_, h0, w_hh, lengths_, clip);
  const int64_t T = d.T, B = d.B, H = d.H;
  auto dy = dy_.contiguous(), y = y_.contiguous(), w = w_hh.contiguous();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = y.options();
  auto dxg = at::empty({T, B, H}, opts);
  auto dh = dhn.clone(at::MemoryFormat::Contiguous);
  auto direct = lengths.defined() ? at::empty({B, H}, opts) : Tensor();
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(y.scalar_type(), "rnn_seq_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using S = scalar_t;
      const int64_t* len = cptr<int64_t>(lengths);
      for (int64_t t = T - 1; t >= 0; --t) {
        L::run(y.device(), B, H,
               cells::RNNBwd<decltype(act)::value, S, acc_t>{
                   .step = {len, t, H}, .dh_next = cptr<S>(dh), .dy = cptr<S>(dy) + t * B * H,
                   .y = cptr<S>(y) + t * B * H, .dpre = mptr<S>(dxg) + t * B * H, .direct = mptr<S>(direct),
                   .clip = acc_t(clip)});
        step_gemm_backward(dh, direct, dxg[t], w);
      }
    });
  });
  auto db = bias_grad(dxg);
  return {dxg, dh, hh_weight_grad(dxg, h0, y, d), db.clone(), db};
}

}  // namespace rnnext
