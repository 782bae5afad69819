// Sequence ops (schemas in ops.cpp): one layer-direction, the whole recurrence in C++.
// Per step: one GEMM hg = h @ w_hh^T into a preallocated buffer, one cells/step.h kernel (which adds
// the biases).
// Backward walks the steps in reverse, then computes dw_hh and db_hh with one GEMM over all steps.
// Nothing is allocated inside the step loops.
//
//   xg       [T, B, G*H]  input projection x @ w_ih^T (no bias), steps in order: the caller flips
//                         reverse directions (each sequence within its length)
//   b_ih     [G*H]        (optional) added to xg by the kernels
//   h0       [B, P]       P = proj_size for LSTM with w_hr, else H;  c0 [B, H] (LSTM)
//   w_hh     [G*H, P]     b_hh [G*H] (optional);  w_hr [P, H] (LSTM proj_size, optional)
//   lengths  [B] int64 on xg's device (optional): rows with lengths[b] <= t keep their state
//   hs       [T+1, B, P]  states: hs[0] = h0, hs[t+1] after step t, hs[T] = h_n; y[t] = hs[t+1]
//                         where t < lengths (the caller masks the rest to 0)
//   cs       [T+1, B, H]  LSTM cell states, likewise
//   saved    [T, B, 4*H]  activated gates for backward (LSTM i,f,g,o; GRU r,z,n,hn)
//   r        [T, B, H]    LSTM with w_hr: cell outputs o*tanh(c) before the projection; else [0]
// Backward takes the gradients of hs (and cs): dy and dh_n arrive there through the caller's views.
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

// The states and their gradients: hs [T+1, B, P] and, for backward, the shapes of what forward saved.
inline void check_saved(const char* op, const Dims& d, const Tensor& hs, const Tensor& dhs, const Tensor& w_hh,
                        int64_t G) {
  check_shape(op, "hs", hs, {d.T + 1, d.B, d.P}, hs);
  check_shape(op, "dhs", dhs, {d.T + 1, d.B, d.P}, hs);
  check_shape(op, "w_hh", w_hh, {G * d.H, d.P}, hs);
}

inline Tensor contiguous_or_undefined(const OptTensor& t) { return t ? t->contiguous() : Tensor(); }

// dh_prev = direct + dgates @ w_hh, where direct is defined
inline void step_gemm_backward(Tensor& dh_prev, const Tensor& direct, const Tensor& dgates, const Tensor& w_hh) {
  if (direct.defined())
    at::addmm_out(dh_prev, direct, dgates, w_hh);
  else
    at::mm_out(dh_prev, dgates, w_hh);
}

// dw_hh = sum over steps of dgates^T @ h_prev, db_hh = sum of dgates: one GEMM for the whole sequence
inline std::tuple<Tensor, Tensor> weight_grads(const Tensor& dgates, const Tensor& hs, const Dims& d) {
  auto dg = dgates.reshape({d.T * d.B, dgates.size(2)});
  return {at::mm(dg.t(), hs.narrow(0, 0, d.T).reshape({d.T * d.B, d.P})), dg.sum(0)};
}

// MKL packs a transposed right operand on every call; a contiguous [K, N] one it reads as is
// (measured: [32,256]x[256,1024] 85 us vs 120 us). Transposed once per sequence, used every step.
inline Tensor right_operand(const Tensor& w) { return w.t().contiguous(); }

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_seq(const Tensor& xg_, const Tensor& h0, const Tensor& c0,
                                                    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                                    const OptTensor& w_hr, const OptTensor& lengths_) {
  const Dims d = check_seq("lstm_seq", 4, xg_, h0, w_hh, b_ih, b_hh, w_hr, lengths_);
  [[maybe_unused]] const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  check_shape("lstm_seq", "c0", c0, {B, H}, xg_);
  auto xg = xg_.contiguous(), xbias = contiguous_or_undefined(b_ih), hbias = contiguous_or_undefined(b_hh);
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = xg.options();
  auto hs = at::empty({T + 1, B, P}, opts), cs = at::empty({T + 1, B, H}, opts),
       saved = at::empty({T, B, 4 * H}, opts), r = at::empty({w_hr ? T : 0, B, H}, opts),
       hg = at::empty({B, 4 * H}, opts);
  auto hp = w_hr && lengths.defined() ? at::empty({B, P}, opts) : Tensor();
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  auto w_hh_t = right_operand(w_hh);
  auto w_hr_t = w_hr ? right_operand(*w_hr) : Tensor();
  RNNEXT_DISPATCH(xg.scalar_type(), "lstm_seq", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* len = cptr<int64_t>(lengths);
    const scalar_t* x = cptr<scalar_t>(xg);
    scalar_t *h = mptr<scalar_t>(hs), *c = mptr<scalar_t>(cs), *s = mptr<scalar_t>(saved), *rr = mptr<scalar_t>(r);
    for (int64_t t = 0; t < T; ++t) {
      auto h_prev = hs[t];
      at::mm_out(hg, h_prev, w_hh_t);
      cells::LSTMFwd<scalar_t, acc_t> f{{len, t, H}, x + t * B * 4 * H, cptr<scalar_t>(hg), cptr<scalar_t>(xbias), cptr<scalar_t>(hbias),
                                        c + t * B * H,
                                        w_hr ? nullptr : h + t * B * P, w_hr ? rr + t * B * H : h + (t + 1) * B * P,
                                        c + (t + 1) * B * H, s + t * B * 4 * H};
      L::run(xg.device(), B, H, f);
      if (!w_hr) continue;
      auto h_next = hs[t + 1];
      if (!hp.defined()) {
        at::mm_out(h_next, r[t], w_hr_t);
        continue;
      }
      at::mm_out(hp, r[t], w_hr_t);
      L::run(xg.device(), B, P, cells::CarryFwd<scalar_t, acc_t>{{len, t, P}, cptr<scalar_t>(hp), h + t * B * P,
                                                                 h + (t + 1) * B * P});
    }
  });
  return {hs, cs, saved, r};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq_backward(
    const Tensor& dhs_, const Tensor& dcs_, const Tensor& hs, const Tensor& cs, const Tensor& saved, const Tensor& r,
    const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& lengths_) {
  const char* op = "lstm_seq_backward";
  TORCH_CHECK(saved.dim() == 3 && saved.size(2) % 4 == 0, op, ": saved must be [T, B, 4*H], got ", saved.sizes());
  const Dims d{saved.size(0), saved.size(1), saved.size(2) / 4, hs.dim() == 3 ? hs.size(2) : -1};
  [[maybe_unused]] const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  check_saved(op, d, hs, dhs_, w_hh, 4);
  check_shape(op, "cs", cs, {T + 1, B, H}, hs);
  check_shape(op, "dcs", dcs_, {T + 1, B, H}, hs);
  if (w_hr) {
    check_shape(op, "w_hr", *w_hr, {P, H}, hs);
    check_shape(op, "r", r, {T, B, H}, hs);
  }
  auto dhs = dhs_.contiguous(), dcs = dcs_.contiguous(), s = saved.contiguous(), w = w_hh.contiguous();
  auto w_p = w_hr ? w_hr->contiguous() : Tensor();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = hs.options();
  auto dxg = at::empty({T, B, 4 * H}, opts), dh = at::zeros({B, P}, opts), dc = at::zeros({B, H}, opts);
  auto direct = lengths.defined() ? at::empty({B, P}, opts) : Tensor();
  auto dhp = w_hr ? at::empty({T, B, P}, opts) : Tensor(), dr = w_hr ? at::empty({B, H}, opts) : Tensor();
  RNNEXT_DISPATCH(hs.scalar_type(), "lstm_seq_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* len = cptr<int64_t>(lengths);
    const scalar_t *ext = cptr<scalar_t>(dhs), *cext = cptr<scalar_t>(dcs), *c = cptr<scalar_t>(cs),
                   *g = cptr<scalar_t>(s);
    for (int64_t t = T - 1; t >= 0; --t) {
      const scalar_t* dh_cell = cptr<scalar_t>(dh);
      const scalar_t* dh_ext = ext + (t + 1) * B * P;
      scalar_t* dir = mptr<scalar_t>(direct);
      if (w_hr) {
        L::run(hs.device(), B, P, cells::CarryBwd<scalar_t, acc_t>{{len, t, P}, dh_cell, dh_ext,
                                                                   mptr<scalar_t>(dhp) + t * B * P, dir});
        at::mm_out(dr, dhp[t], w_p);
        dh_cell = cptr<scalar_t>(dr);
        dh_ext = nullptr;
        dir = nullptr;
      }
      cells::LSTMBwd<scalar_t, acc_t> f{{len, t, H}, dh_cell, dh_ext, cext + (t + 1) * B * H, g + t * B * 4 * H,
                                        c + t * B * H, c + (t + 1) * B * H, mptr<scalar_t>(dc),
                                        mptr<scalar_t>(dxg) + t * B * 4 * H, dir};
      L::run(hs.device(), B, H, f);
      step_gemm_backward(dh, direct, dxg[t], w);
    }
  });
  auto [dw_hh, db_hh] = weight_grads(dxg, hs, d);
  auto dw_hr = w_hr ? at::mm(dhp.reshape({T * B, P}).t(), r.reshape({T * B, H})) : at::empty({0}, opts);
  return {dxg, dh.add_(dhs[0]), dc.add_(dcs[0]), dw_hh, db_hh.clone(), db_hh, dw_hr};
}

template <typename L>
std::tuple<Tensor, Tensor> gru_seq(const Tensor& xg_, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_ih,
                                   const OptTensor& b_hh, const OptTensor& lengths_) {
  const Dims d = check_seq("gru_seq", 3, xg_, h0, w_hh, b_ih, b_hh, std::nullopt, lengths_);
  [[maybe_unused]] const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  auto xg = xg_.contiguous(), xbias = contiguous_or_undefined(b_ih), hbias = contiguous_or_undefined(b_hh);
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = xg.options();
  auto hs = at::empty({T + 1, B, H}, opts), saved = at::empty({T, B, 4 * H}, opts), hg = at::empty({B, 3 * H}, opts);
  hs[0].copy_(h0);
  auto w_hh_t = right_operand(w_hh);
  RNNEXT_DISPATCH(xg.scalar_type(), "gru_seq", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* len = cptr<int64_t>(lengths);
    const scalar_t* x = cptr<scalar_t>(xg);
    scalar_t *h = mptr<scalar_t>(hs), *s = mptr<scalar_t>(saved);
    for (int64_t t = 0; t < T; ++t) {
      auto h_prev = hs[t];
      at::mm_out(hg, h_prev, w_hh_t);
      cells::GRUFwd<scalar_t, acc_t> f{{len, t, H}, x + t * B * 3 * H, cptr<scalar_t>(hg), cptr<scalar_t>(xbias), cptr<scalar_t>(hbias),
                                       h + t * B * H,
                                       h + (t + 1) * B * H, s + t * B * 4 * H};
      L::run(xg.device(), B, H, f);
    }
  });
  return {hs, saved};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_seq_backward(const Tensor& dhs_, const Tensor& hs, const Tensor& saved,
                                                            const Tensor& w_hh, const OptTensor& lengths_) {
  const char* op = "gru_seq_backward";
  TORCH_CHECK(saved.dim() == 3 && saved.size(2) % 4 == 0, op, ": saved must be [T, B, 4*H], got ", saved.sizes());
  const Dims d{saved.size(0), saved.size(1), saved.size(2) / 4, saved.size(2) / 4};
  [[maybe_unused]] const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  check_saved(op, d, hs, dhs_, w_hh, 3);
  auto dhs = dhs_.contiguous(), s = saved.contiguous(), w = w_hh.contiguous();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = hs.options();
  auto dxg = at::empty({T, B, 3 * H}, opts), dhg = at::empty({T, B, 3 * H}, opts), dh = at::zeros({B, H}, opts),
       direct = at::empty({B, H}, opts);
  RNNEXT_DISPATCH(hs.scalar_type(), "gru_seq_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* len = cptr<int64_t>(lengths);
    const scalar_t *ext = cptr<scalar_t>(dhs), *h = cptr<scalar_t>(hs), *g = cptr<scalar_t>(s);
    for (int64_t t = T - 1; t >= 0; --t) {
      cells::GRUBwd<scalar_t, acc_t> f{{len, t, H}, cptr<scalar_t>(dh), ext + (t + 1) * B * H, g + t * B * 4 * H,
                                       h + t * B * H, mptr<scalar_t>(dxg) + t * B * 3 * H,
                                       mptr<scalar_t>(dhg) + t * B * 3 * H, mptr<scalar_t>(direct)};
      L::run(hs.device(), B, H, f);
      step_gemm_backward(dh, direct, dhg[t], w);
    }
  });
  auto [dw_hh, db_hh] = weight_grads(dhg, hs, d);
  return {dxg, dh.add_(dhs[0]), dw_hh, dxg.sum(at::IntArrayRef{0, 1}), db_hh};
}

template <typename L>
Tensor rnn_seq(const Tensor& xg_, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
               const OptTensor& lengths_, std::string_view nonlinearity) {
  const Dims d = check_seq("rnn_seq", 1, xg_, h0, w_hh, b_ih, b_hh, std::nullopt, lengths_);
  [[maybe_unused]] const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  auto xg = xg_.contiguous(), xbias = contiguous_or_undefined(b_ih), hbias = contiguous_or_undefined(b_hh);
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = xg.options();
  auto hs = at::empty({T + 1, B, H}, opts), hg = at::empty({B, H}, opts);
  hs[0].copy_(h0);
  auto w_hh_t = right_operand(w_hh);
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(xg.scalar_type(), "rnn_seq", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t* len = cptr<int64_t>(lengths);
      const scalar_t* x = cptr<scalar_t>(xg);
      scalar_t* h = mptr<scalar_t>(hs);
      for (int64_t t = 0; t < T; ++t) {
        auto h_prev = hs[t];
        at::mm_out(hg, h_prev, w_hh_t);
        cells::RNNFwd<decltype(act)::value, scalar_t, acc_t> f{{len, t, H}, x + t * B * H, cptr<scalar_t>(hg),
                                                               cptr<scalar_t>(xbias), cptr<scalar_t>(hbias), h + t * B * H,
                                                               h + (t + 1) * B * H};
        L::run(xg.device(), B, H, f);
      }
    });
  });
  return hs;
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_seq_backward(const Tensor& dhs_, const Tensor& hs, const Tensor& w_hh,
                                                            const OptTensor& lengths_, std::string_view nonlinearity) {
  const char* op = "rnn_seq_backward";
  TORCH_CHECK(hs.dim() == 3 && hs.size(0) >= 1, op, ": hs must be [T+1, B, H], got ", hs.sizes());
  const Dims d{hs.size(0) - 1, hs.size(1), hs.size(2), hs.size(2)};
  [[maybe_unused]] const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  check_saved(op, d, hs, dhs_, w_hh, 1);
  auto dhs = dhs_.contiguous(), h_all = hs.contiguous(), w = w_hh.contiguous();
  auto lengths = contiguous_or_undefined(lengths_);
  auto opts = hs.options();
  auto dxg = at::empty({T, B, H}, opts), dh = at::zeros({B, H}, opts);
  auto direct = lengths.defined() ? at::empty({B, H}, opts) : Tensor();
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(hs.scalar_type(), "rnn_seq_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t* len = cptr<int64_t>(lengths);
      const scalar_t *ext = cptr<scalar_t>(dhs), *h = cptr<scalar_t>(h_all);
      for (int64_t t = T - 1; t >= 0; --t) {
        cells::RNNBwd<decltype(act)::value, scalar_t, acc_t> f{{len, t, H}, cptr<scalar_t>(dh),
                                                               ext + (t + 1) * B * H, h + (t + 1) * B * H,
                                                               mptr<scalar_t>(dxg) + t * B * H, mptr<scalar_t>(direct)};
        L::run(hs.device(), B, H, f);
        step_gemm_backward(dh, direct, dxg[t], w);
      }
    });
  });
  auto [dw_hh, db_hh] = weight_grads(dxg, h_all, d);
  return {dxg, dh.add_(dhs[0]), dw_hh, db_hh.clone(), db_hh};
}

}  // namespace rnnext
