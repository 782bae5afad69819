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

inline Dims check_seq(const char* op, int64_t G, const Tensor& xg, const Tensor& h0, const Tensor& w_hh,
                      const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& lengths) {
  TORCH_CHECK(xg.dim() == 3, op, ": expected xg of shape [T, B, ", G, "*H], got ", xg.sizes());
  TORCH_CHECK(xg.size(0) > 0, op, ": expected a sequence length larger than 0");
  TORCH_CHECK(at::isFloatingType(xg.scalar_type()), op, ": expected a floating point xg, got ", xg.scalar_type());
  TORCH_CHECK(xg.size(2) % G == 0, op, ": xg.size(2) = ", xg.size(2), " is not a multiple of ", G);
  const int64_t T = xg.size(0), B = xg.size(1), H = xg.size(2) / G;
  TORCH_CHECK(!w_hr || (w_hr->dim() == 2 && w_hr->size(1) == H), op, ": expected w_hr of shape [P, ", H, "]");
  const int64_t P = w_hr ? w_hr->size(0) : H;
  if (w_hr) check_like(op, "w_hr", *w_hr, xg);
  check_shape(op, "h0", h0, {B, P}, xg);
  check_shape(op, "w_hh", w_hh, {G * H, P}, xg);
  if (b_ih) check_shape(op, "b_ih", *b_ih, {G * H}, xg);
  if (b_hh) check_shape(op, "b_hh", *b_hh, {G * H}, xg);
  if (lengths) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && lengths->scalar_type() == at::kLong, op,
                ": expected int64 lengths of shape [", B, "], got ", lengths->scalar_type(), " ", lengths->sizes());
    TORCH_CHECK(lengths->device() == xg.device(), op, ": lengths is on ", lengths->device(), " but xg is on ",
                xg.device());
  }
  return {T, B, H, P};
}

// Backward's view of what forward returned: saved [T, B, S*H] fixes T, B, H; y fixes P.
inline Dims check_saved(const char* op, const Tensor& saved, int64_t S, const Tensor& dy, const Tensor& dhn,
                        const Tensor& y, const Tensor& h0, const Tensor& w_hh, int64_t G) {
  TORCH_CHECK(saved.dim() == 3 && saved.size(2) % S == 0, op, ": saved must be [T, B, ", S, "*H], got ",
              saved.sizes());
  TORCH_CHECK(y.dim() == 3, op, ": y must be [T, B, P], got ", y.sizes());
  const Dims d{saved.size(0), saved.size(1), saved.size(2) / S, y.size(2)};
  check_shape(op, "y", y, {d.T, d.B, d.P}, y);
  check_shape(op, "dy", dy, {d.T, d.B, d.P}, y);
  check_shape(op, "dhn", dhn, {d.B, d.P}, y);
  check_shape(op, "h0", h0, {d.B, d.P}, y);
  check_shape(op, "w_hh", w_hh, {G * d.H, d.P}, y);
  return d;
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
                                                                    double /*clip: for backward*/, bool save) {
  const Dims d = check_seq("lstm_seq", 4, xg_, h0, w_hh, b_ih, b_hh, w_hr, lengths_);
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  check_shape("lstm_seq", "c0", c0, {B, H}, xg_);
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
      S* out = w_hr ? mptr<S>(r) + t * B * H : mptr<S>(y) + t * B * P;
      L::run(xg.device(), B, H,
             cells::LSTMFwd<S, acc_t, acc_t>{{len, t, H}, cptr<S>(xg) + t * B * 4 * H, cptr<S>(hg), cptr<S>(xb),
                                      cptr<S>(hb), cptr<acc_t>(c), w_hr ? nullptr : cptr<S>(h), mptr<acc_t>(c),
                                      save ? mptr<S>(c_all) + t * B * H : nullptr, w_hr ? nullptr : mptr<S>(h), out,
                                      save ? mptr<S>(saved) + t * B * 4 * H : nullptr});
      if (!w_hr) continue;
      at::mm_out(hp, r[t], wr_t);
      L::run(xg.device(), B, P, cells::CarryFwd<S, acc_t>{{len, t, P}, cptr<S>(hp), mptr<S>(h), mptr<S>(y) + t * B * P});
    }
  });
  return {y, h, c.to(xg.scalar_type()), c_all, saved, r};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq_backward(
    const Tensor& dy_, const Tensor& dhn, const Tensor& dcn, const Tensor& y, const Tensor& h0, const Tensor& c0_,
    const Tensor& c_all, const Tensor& saved_, const Tensor& r, const Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& lengths_, double clip) {
  const char* op = "lstm_seq_backward";
  const Dims d = check_saved(op, saved_, 4, dy_, dhn, y, h0, w_hh, 4);
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  for (auto [name, t] : {std::pair{"dcn", &dcn}, {"c0", &c0_}}) check_shape(op, name, *t, {B, H}, y);
  check_shape(op, "c_all", c_all, {T, B, H}, y);
  if (w_hr) {
    check_shape(op, "w_hr", *w_hr, {P, H}, y);
    check_shape(op, "r", r, {T, B, H}, y);
  }
  auto dy = dy_.contiguous(), saved = saved_.contiguous(), cs = c_all.contiguous(), c0 = c0_.contiguous(),
       w = w_hh.contiguous(), wr = w_hr ? w_hr->contiguous() : Tensor();
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
               cells::CarryBwd<S, acc_t>{{len, t, P}, dh_cell, dy_t, mptr<S>(dhp) + t * B * P, dir, acc_t(clip)});
        at::mm_out(dr, dhp[t], wr);
        dh_cell = cptr<S>(dr);
        dy_t = nullptr;
        dir = nullptr;
      }
      const S* c_prev = t ? cptr<S>(cs) + (t - 1) * B * H : cptr<S>(c0);
      L::run(y.device(), B, H,
             cells::LSTMBwd<S, acc_t, acc_t>{{len, t, H}, dh_cell, dy_t, cptr<S>(saved) + t * B * 4 * H, c_prev,
                                      cptr<S>(cs) + t * B * H, mptr<acc_t>(dc), mptr<S>(dxg) + t * B * 4 * H, dir,
                                      acc_t(w_hr ? 0 : clip)});
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
                                             bool save) {
  const Dims d = check_seq(op, G, xg_, h0, w_hh, b_ih, b_hh, std::nullopt, lengths_);
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
             Fwd<S, acc_t>{{len, t, H}, cptr<S>(xg) + t * B * G * H, cptr<S>(hg), cptr<S>(xb), cptr<S>(hb), cptr<S>(h),
                           mptr<S>(h), mptr<S>(y) + t * B * H, save ? mptr<S>(saved) + t * B * S_ * H : nullptr});
    }
  });
  return {y, h, saved};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> gru_seq(const Tensor& xg, const Tensor& h0, const Tensor& w_hh,
                                           const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                                           double /*clip: for backward*/, bool save) {
  return gated_seq<L, cells::GRUFwd, 3, 4>("gru_seq", xg, h0, w_hh, b_ih, b_hh, lengths, save);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_seq_backward(const Tensor& dy_, const Tensor& dhn,
                                                                    const Tensor& y, const Tensor& h0_,
                                                                    const Tensor& saved_, const Tensor& w_hh,
                                                                    const OptTensor& lengths_, double clip) {
  const Dims d = check_saved("gru_seq_backward", saved_, 4, dy_, dhn, y, h0_, w_hh, 3);
  const int64_t T = d.T, B = d.B, H = d.H;
  auto dy = dy_.contiguous(), saved = saved_.contiguous(), h0 = h0_.contiguous(), w = w_hh.contiguous();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = y.options();
  auto dxg = at::empty({T, B, 3 * H}, opts), dhg = at::empty({T, B, 3 * H}, opts), direct = at::empty({B, H}, opts);
  auto dh = dhn.clone(at::MemoryFormat::Contiguous);
  RNNEXT_DISPATCH(y.scalar_type(), "gru_seq_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = scalar_t;
    const int64_t* len = cptr<int64_t>(lengths);
    for (int64_t t = T - 1; t >= 0; --t) {
      const S* h_prev = t ? cptr<S>(y) + (t - 1) * B * H : cptr<S>(h0);
      L::run(y.device(), B, H,
             cells::GRUBwd<S, acc_t>{{len, t, H}, cptr<S>(dh), cptr<S>(dy) + t * B * H, cptr<S>(saved) + t * B * 4 * H,
                                     h_prev, mptr<S>(dxg) + t * B * 3 * H, mptr<S>(dhg) + t * B * 3 * H,
                                     mptr<S>(direct), acc_t(clip)});
      step_gemm_backward(dh, direct, dhg[t], w);
    }
  });
  return {dxg, dh, hh_weight_grad(dhg, h0, y, d), bias_grad(dxg), bias_grad(dhg)};
}

template <typename L>
std::tuple<Tensor, Tensor> rnn_seq(const Tensor& xg_, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_ih,
                                   const OptTensor& b_hh, const OptTensor& lengths_, std::string_view nonlinearity,
                                   double /*clip: for backward*/) {
  const Dims d = check_seq("rnn_seq", 1, xg_, h0, w_hh, b_ih, b_hh, std::nullopt, lengths_);
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
               cells::RNNFwd<decltype(act)::value, S, acc_t>{{len, t, H}, cptr<S>(xg) + t * B * H, cptr<S>(hg),
                                                            cptr<S>(xb), cptr<S>(hb), cptr<S>(h), mptr<S>(h),
                                                            mptr<S>(y) + t * B * H});
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
  // RNN saves nothing but y: y itself stands in for "saved" in the shape checks.
  const Dims d = check_saved("rnn_seq_backward", y_, 1, dy_, dhn, y_, h0, w_hh, 1);
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
               cells::RNNBwd<decltype(act)::value, S, acc_t>{{len, t, H}, cptr<S>(dh), cptr<S>(dy) + t * B * H,
                                                            cptr<S>(y) + t * B * H, mptr<S>(dxg) + t * B * H,
                                                            mptr<S>(direct), acc_t(clip)});
        step_gemm_backward(dh, direct, dxg[t], w);
      }
    });
  });
  auto db = bias_grad(dxg);
  return {dxg, dh, hh_weight_grad(dxg, h0, y, d), db.clone(), db};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> mgru_seq(const Tensor& xg, const Tensor& h0, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                                            double /*clip: for backward*/, bool save) {
  return gated_seq<L, cells::MGRUFwd, 2, 2>("mgru_seq", xg, h0, w_hh, b_ih, b_hh, lengths, save);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mgru_seq_backward(const Tensor& dy_, const Tensor& dhn,
                                                                     const Tensor& y, const Tensor& h0_,
                                                                     const Tensor& saved_, const Tensor& w_hh,
                                                                     const OptTensor& lengths_, double clip) {
  const Dims d = check_saved("mgru_seq_backward", saved_, 2, dy_, dhn, y, h0_, w_hh, 2);
  const int64_t T = d.T, B = d.B, H = d.H;
  auto dy = dy_.contiguous(), saved = saved_.contiguous(), h0 = h0_.contiguous(), w = w_hh.contiguous();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = y.options();
  auto dxg = at::empty({T, B, 2 * H}, opts), direct = at::empty({B, H}, opts);
  auto dh = dhn.clone(at::MemoryFormat::Contiguous);
  RNNEXT_DISPATCH(y.scalar_type(), "mgru_seq_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = scalar_t;
    const int64_t* len = cptr<int64_t>(lengths);
    for (int64_t t = T - 1; t >= 0; --t) {
      const S* h_prev = t ? cptr<S>(y) + (t - 1) * B * H : cptr<S>(h0);
      L::run(y.device(), B, H,
             cells::MGRUBwd<S, acc_t>{{len, t, H}, cptr<S>(dh), cptr<S>(dy) + t * B * H, cptr<S>(saved) + t * B * 2 * H,
                                      h_prev, mptr<S>(dxg) + t * B * 2 * H, mptr<S>(direct), acc_t(clip)});
      step_gemm_backward(dh, direct, dxg[t], w);
    }
  });
  auto db = bias_grad(dxg);
  return {dxg, dh, hh_weight_grad(dxg, h0, y, d), db.clone(), db};
}

}  // namespace rnnext
