// Sequence ops (schemas in ops.cpp): one layer-direction, the input projection and the whole
// recurrence in C++ (driver/loops.h: per step one GEMM hg = h @ w_hh^T and one cells/step.h kernel,
// which adds the biases; or the device's persistent kernel). Backward walks the steps in reverse; the
// weight gradients are GEMMs over chunks of steps. Nothing is allocated inside the step loops.
//
//   x        [T, B, I]    input, T >= 1, steps in order: the caller flips reverse directions (each
//                         sequence within its length)
//   w_ih     [G*H, I]     xg = x @ w_ih^T is computed here, a few steps at a time on CPU
//   h0       [B, P]       P = proj_size for LSTM with w_hr, else H;  c0 [B, H] (LSTM)
//   w_hh     [G*H, P]     b_ih, b_hh [G*H] (optional);  w_hr [P, H] (LSTM proj_size, optional)
//   lengths  [B] int64 on x's device (optional): rows with lengths[b] <= t keep their state and
//                         output 0
//   y        [T, B, P]    outputs;  h_n [B, P], c_n [B, H] the final (carried) states; the cell state is
//                         carried in float for 16-bit types (the GEMM input h stays in the input type)
//   c_all    [T, B, H]    LSTM cell state after each step (0 past the end), for backward
//   saved    [T, B, S*H]  activated gates for backward (LSTM i,f,g,o; GRU r,z,n,hn; lecture's GRU u,c~)
//   save     false: no backward will follow (no_grad); c_all and saved are then [0, B, .] and not written
//   r        [T, B, H]    LSTM with w_hr: cell outputs o*tanh(c) before the projection; else [0]
//   path     0 auto, 1 per-step, 2 persistent (where the device has it and the plan fits; else per-step)
//   ln_w, ln_b    [N*H] the layer-normalised cells' norms (cells/layernorm.h: LSTM N = 5, GRU N = 6), eps;
//                 norm [T, B, N*H] and rstd [T, B, 2] (float, double for double) what their backward needs
//   zoneout_mask  [T, B, Z*H] keep weights (Z = 2 LSTM: h then c; 1 GRU), optional; else zoneout: the keep
//                 weight of every unit (eval's mixture); see cells/step.h. LSTM and GRU only, not with w_hr
// Backward needs the state before each step only where the step is within its sequence, and there it
// equals the previous output: h_prev[t] = y[t-1] (h0 at t = 0), so the states are not saved.
#pragma once
#include "driver/loops.h"

namespace rnnext {

struct Dims {
  int64_t T, B, H, P;
};

inline Path check_path(const char* op, int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, op, ": expected path 0 (auto), 1 (per-step) or 2 (persistent), got ", path);
  return static_cast<Path>(path);
}

struct Zoneout {
  Tensor mask;  // contiguous, or undefined
  double p;
  bool on() const { return mask.defined() || p > 0; }
};

inline Zoneout check_zoneout(const Checks& c, const OptTensor& mask, double p, int64_t Z, const Dims& d,
                             bool projected) {
  TORCH_CHECK(p >= 0 && p <= 1, c.op, ": expected zoneout in [0, 1], got ", p);
  if (mask) c.shape("zoneout_mask", *mask, {d.T, d.B, Z * d.H});
  TORCH_CHECK(!(projected && (mask || p > 0)), c.op, ": zoneout with proj_size is not supported");
  return {mask ? mask->contiguous() : Tensor(), p};
}

// Forward: x [T, B, I] fixes T, B, I and the device and dtype of everything; w_ih H; w_hr P.
inline Dims check_seq(const char* op, int64_t G, const Tensor& x, const Tensor& w_ih, const Tensor& h0,
                      const Tensor* c0, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                      const OptTensor& w_hr, const OptTensor& lengths, double clip) {
  const Checks c{op, "x", x};
  c.dims(x, 3, "[T, B, I]");
  TORCH_CHECK(x.size(0) > 0, op, ": expected a sequence length larger than 0");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % G == 0 && w_ih.size(1) == I, op, ": expected w_ih of shape [", G,
              "*H, ", I, "], got ", w_ih.sizes());
  c.like("w_ih", w_ih);
  const int64_t H = w_ih.size(0) / G;
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
// h0, w_hh, x and w_ih are checked here, the cell's other tensors by the caller.
inline Dims check_seq_backward(const Checks& c, int64_t G, bool projected, const Tensor& dy, const Tensor& dhn,
                               const Tensor& x, const Tensor& w_ih, const Tensor& y, const Tensor& h0,
                               const Tensor& w_hh, const OptTensor& lengths, double clip) {
  c.dims(y, 3, "[T, B, P]");
  TORCH_CHECK(y.size(0) > 0, c.op, ": expected a sequence length larger than 0");
  const int64_t P = y.size(2), H = projected && w_hh.dim() == 2 ? w_hh.size(0) / G : P;
  const Dims d{y.size(0), y.size(1), H, P};
  c.shape("w_hh", w_hh, {G * H, P});
  c.shape("dy", dy, {d.T, d.B, P});
  c.shape("dhn", dhn, {d.B, P});
  c.shape("h0", h0, {d.B, P});
  TORCH_CHECK(x.dim() == 3 && x.size(0) == d.T && x.size(1) == d.B, c.op, ": expected x of shape [", d.T, ", ", d.B,
              ", I], got ", x.sizes());
  c.like("x", x);
  c.shape("w_ih", w_ih, {G * H, x.size(2)});
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

inline FwdTensors fwd_tensors(const Dims& d, int64_t S, const Tensor& x, const Tensor& w_ih, const Tensor& h0,
                              const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                              const OptTensor& lengths, bool save, bool lstm) {
  auto opts = x.options();
  const int64_t Ts = save ? d.T : 0;
  return {.x = x.contiguous(), .w_ih = w_ih.contiguous(), .b_ih = contiguous_or_undefined(b_ih),
          .b_hh = contiguous_or_undefined(b_hh), .w_hh = w_hh.contiguous(), .w_hr = contiguous_or_undefined(w_hr),
          .lengths = contiguous_or_undefined(lengths), .y = at::empty({d.T, d.B, d.P}, opts),
          .h = h0.clone(at::MemoryFormat::Contiguous), .c_all = at::empty({lstm ? Ts : 0, d.B, d.H}, opts),
          .saved = at::empty({S ? Ts : 0, d.B, S * d.H}, opts), .r = at::empty({w_hr ? d.T : 0, d.B, d.H}, opts)};
}

template <typename S, typename A>
cells::SeqFwd<S, A> fwd_pointers(const Dims& d, FwdTensors& f, Tensor& c, bool save, const Zoneout& z = {}) {
  return {.T = d.T, .B = d.B, .H = d.H, .P = d.P, .t0 = 0, .lengths = cptr<int64_t>(f.lengths), .xg = nullptr,
          .b_ih = cptr<S>(f.b_ih), .b_hh = cptr<S>(f.b_hh), .st = mptr<A>(c), .y = mptr<S>(f.y),
          .st_all = save && f.c_all.numel() ? mptr<S>(f.c_all) : nullptr,
          .saved = save && f.saved.numel() ? mptr<S>(f.saved) : nullptr, .r = f.w_hr.defined() ? mptr<S>(f.r) : nullptr,
          .keep = cptr<S>(z.mask), .keep_p = A(z.p)};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq(const Tensor& x, const Tensor& w_ih,
                                                                    const Tensor& h0, const Tensor& c0,
                                                                    const Tensor& w_hh, const OptTensor& b_ih,
                                                                    const OptTensor& b_hh, const OptTensor& w_hr,
                                                                    const OptTensor& lengths, double clip, bool save,
                                                                    int64_t path, const OptTensor& zoneout_mask,
                                                                    double zoneout) {
  const Dims d = check_seq("lstm_seq", 4, x, w_ih, h0, &c0, w_hh, b_ih, b_hh, w_hr, lengths, clip);
  const Path how = check_path("lstm_seq", path);
  const auto z = check_zoneout({"lstm_seq", "x", x}, zoneout_mask, zoneout, 2, d, w_hr.has_value());
  auto f = fwd_tensors(d, 4, x, w_ih, h0, w_hh, b_ih, b_hh, w_hr, lengths, save, true);
  Tensor c;  // the carried cell state, in acc_t: 16-bit types would round it at every step
  RNNEXT_DISPATCH(x.scalar_type(), "lstm_seq", [&] {
    using A = at::opmath_type<scalar_t>;
    c = c0.to(c10::CppTypeToScalarType<A>::value, false, true, at::MemoryFormat::Contiguous);
    forward<L, cells::LSTM>(how, fwd_pointers<scalar_t, A>(d, f, c, save, z), f);
  });
  return {f.y, f.h, c.to(x.scalar_type()), f.c_all, f.saved, f.r};
}

// Forward of the GRU and the lecture's GRU.
template <typename L, typename Cell>
std::tuple<Tensor, Tensor, Tensor> gated_seq(const char* op, const Tensor& x, const Tensor& w_ih, const Tensor& h0,
                                             const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                             const OptTensor& lengths, double clip, bool save, int64_t path,
                                             const OptTensor& zoneout_mask = std::nullopt, double zoneout = 0) {
  const Dims d = check_seq(op, Cell::G, x, w_ih, h0, nullptr, w_hh, b_ih, b_hh, std::nullopt, lengths, clip);
  const Path how = check_path(op, path);
  const auto z = Cell::separate_hg ? check_zoneout({op, "x", x}, zoneout_mask, zoneout, 1, d, false) : Zoneout{};
  auto f = fwd_tensors(d, Cell::SAVED, x, w_ih, h0, w_hh, b_ih, b_hh, std::nullopt, lengths, save, false);
  Tensor none;
  RNNEXT_DISPATCH(x.scalar_type(), "gated_seq", [&] {
    using A = at::opmath_type<scalar_t>;
    forward<L, Cell>(how, fwd_pointers<scalar_t, A>(d, f, none, save, z), f);
  });
  return {f.y, f.h, f.saved};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> gru_seq(const Tensor& x, const Tensor& w_ih, const Tensor& h0, const Tensor& w_hh,
                                           const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                                           double clip, bool save, int64_t path, const OptTensor& zoneout_mask,
                                           double zoneout) {
  return gated_seq<L, cells::GRU>("gru_seq", x, w_ih, h0, w_hh, b_ih, b_hh, lengths, clip, save, path, zoneout_mask,
                                  zoneout);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor> mgru_seq(const Tensor& x, const Tensor& w_ih, const Tensor& h0, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                                            double clip, bool save, int64_t path) {
  return gated_seq<L, cells::MinimalGRU>("mgru_seq", x, w_ih, h0, w_hh, b_ih, b_hh, lengths, clip, save, path);
}

template <typename L>
std::tuple<Tensor, Tensor> rnn_seq(const Tensor& x, const Tensor& w_ih, const Tensor& h0, const Tensor& w_hh,
                                   const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                                   std::string_view nonlinearity, double clip, int64_t path) {
  const Dims d = check_seq("rnn_seq", 1, x, w_ih, h0, nullptr, w_hh, b_ih, b_hh, std::nullopt, lengths, clip);
  const Path how = check_path("rnn_seq", path);
  auto f = fwd_tensors(d, 0, x, w_ih, h0, w_hh, b_ih, b_hh, std::nullopt, lengths, false, false);
  Tensor none;
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(x.scalar_type(), "rnn_seq", [&] {
      using A = at::opmath_type<scalar_t>;
      forward<L, cells::RNN<decltype(act)::value>>(how, fwd_pointers<scalar_t, A>(d, f, none, false), f);
    });
  });
  return {f.y, f.h};
}

inline BwdTensors bwd_tensors(const Dims& d, int64_t G, bool need_direct, const Tensor& dy, const Tensor& dhn,
                              const Tensor& x, const Tensor& w_ih, const Tensor& y, const Tensor& h0,
                              const Tensor& saved, const Tensor& w_hh, const OptTensor& lengths) {
  auto opts = y.options();
  const int64_t I = x.size(2);
  return {.dy = dy, .y = y.contiguous(), .h0 = h0.contiguous(), .saved = saved.contiguous(),
          .w_hh = w_hh.contiguous(), .x = x.contiguous(), .w_ih = w_ih.contiguous(),
          .lengths = contiguous_or_undefined(lengths), .dh = dhn.clone(at::MemoryFormat::Contiguous),
          .direct = need_direct ? at::empty({d.B, d.P}, opts) : Tensor(), .dx = at::empty({d.T, d.B, I}, opts),
          .dw_ih_t = at::zeros({I, G * d.H}, opts), .dw_hh_t = at::zeros({d.P, G * d.H}, opts),
          .db_ih = at::zeros({G * d.H}, opts), .db_hh = at::zeros({G * d.H}, opts)};
}

template <typename S, typename A>
cells::SeqBwd<S, A> bwd_pointers(const Dims& d, BwdTensors& b, const Tensor& c_all, const Tensor& c0, Tensor& dc,
                                 double clip, const Zoneout& z = {}) {
  return {.T = d.T, .B = d.B, .H = d.H, .P = d.P, .t0 = 0, .lengths = cptr<int64_t>(b.lengths), .dy = cptr<S>(b.dy),
          .y = cptr<S>(b.y), .h0 = cptr<S>(b.h0), .saved = cptr<S>(b.saved), .st_all = cptr<S>(c_all),
          .s0 = cptr<S>(c0), .dst = mptr<A>(dc), .dxg = nullptr, .dhg = nullptr, .direct = mptr<S>(b.direct),
          .clip = A(clip), .keep = cptr<S>(z.mask), .keep_p = A(z.p)};
}

// dx, dw_ih, dh0, dw_hh, db_ih, db_hh: the gradients every cell returns.
template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gradients(BwdTensors& b, bool separate_dhg) {
  return {b.dx, L::contiguous(b.dw_ih_t.t()), b.dh, L::contiguous(b.dw_hh_t.t()), b.db_ih,
          separate_dhg ? b.db_hh : b.db_ih.clone()};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq_backward(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const Tensor& w_ih, const Tensor& y,
    const Tensor& h0, const Tensor& c0_, const Tensor& c_all_, const Tensor& saved, const Tensor& r_,
    const Tensor& w_hh, const OptTensor& w_hr_, const OptTensor& lengths, double clip, int64_t path,
    const OptTensor& zoneout_mask, double zoneout) {
  const Checks ck{"lstm_seq_backward", "y", y};
  const Dims d = check_seq_backward(ck, 4, w_hr_.has_value(), dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip);
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  if (w_hr_) ck.shape("w_hr", *w_hr_, {P, H});
  ck.shape("dcn", dcn, {B, H});
  ck.shape("c0", c0_, {B, H});
  ck.shape("c_all", c_all_, {T, B, H});
  check_saved(ck, saved, 4, d);
  if (w_hr_) ck.shape("r", r_, {T, B, H});
  const Path how = check_path(ck.op, path);
  const auto z = check_zoneout(ck, zoneout_mask, zoneout, 2, d, w_hr_.has_value());
  const bool proj = w_hr_.has_value();
  auto b = bwd_tensors(d, 4, lengths.has_value() || z.on(), dy, dhn, x, w_ih, y, h0, saved, w_hh, lengths);
  auto c_all = c_all_.contiguous(), c0 = c0_.contiguous(), r = r_.contiguous();
  auto w_hr = contiguous_or_undefined(w_hr_);
  auto dhp = proj ? at::empty({T, B, P}, y.options()) : Tensor();
  Tensor dc;  // carried across steps like c: in acc_t
  RNNEXT_DISPATCH(y.scalar_type(), "lstm_seq_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    dc = dcn.to(c10::CppTypeToScalarType<A>::value, false, true, at::MemoryFormat::Contiguous);
    backward<L, cells::LSTM>(how, bwd_pointers<scalar_t, A>(d, b, c_all, c0, dc, clip, z), b, w_hr, dhp);
  });
  auto dw_hr = proj ? at::empty({P, H}, y.options()) : at::empty({0}, y.options());
  if (proj) L::gemm(dw_hr, dhp.reshape({T * B, P}).t(), r.reshape({T * B, H}), Tensor());  // over all steps
  auto [dx, dw_ih, dh0, dw_hh, db_ih, db_hh] = gradients<L>(b, false);
  return {dx, dw_ih, dh0, dc.to(y.scalar_type()), dw_hh, db_ih, db_hh, dw_hr};
}

// Backward of gated_seq.
template <typename L, typename Cell>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_seq_backward(
    const char* op, const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& w_ih, const Tensor& y,
    const Tensor& h0, const Tensor& saved, const Tensor& w_hh, const OptTensor& lengths, double clip, int64_t path,
    const OptTensor& zoneout_mask = std::nullopt, double zoneout = 0) {
  const Checks ck{op, "y", y};
  const Dims d = check_seq_backward(ck, Cell::G, false, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip);
  check_saved(ck, saved, Cell::SAVED, d);
  const Path how = check_path(op, path);
  const auto z = Cell::separate_hg ? check_zoneout(ck, zoneout_mask, zoneout, 1, d, false) : Zoneout{};
  auto b = bwd_tensors(d, Cell::G, true, dy, dhn, x, w_ih, y, h0, saved, w_hh, lengths);
  Tensor none;
  RNNEXT_DISPATCH(y.scalar_type(), "gated_seq_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    backward<L, Cell>(how, bwd_pointers<scalar_t, A>(d, b, none, none, none, clip, z), b, none, none);
  });
  return gradients<L>(b, Cell::separate_hg);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_seq_backward(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& w_ih, const Tensor& y, const Tensor& h0,
    const Tensor& saved, const Tensor& w_hh, const OptTensor& lengths, double clip, int64_t path,
    const OptTensor& zoneout_mask, double zoneout) {
  return gated_seq_backward<L, cells::GRU>("gru_seq_backward", dy, dhn, x, w_ih, y, h0, saved, w_hh, lengths, clip,
                                           path, zoneout_mask, zoneout);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mgru_seq_backward(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& w_ih, const Tensor& y, const Tensor& h0,
    const Tensor& saved, const Tensor& w_hh, const OptTensor& lengths, double clip, int64_t path) {
  return gated_seq_backward<L, cells::MinimalGRU>("mgru_seq_backward", dy, dhn, x, w_ih, y, h0, saved, w_hh, lengths, clip,
                                            path);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_seq_backward(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& w_ih, const Tensor& y, const Tensor& h0,
    const Tensor& w_hh, const OptTensor& lengths, std::string_view nonlinearity, double clip, int64_t path) {
  const Checks ck{"rnn_seq_backward", "y", y};
  const Dims d = check_seq_backward(ck, 1, false, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip);
  const Path how = check_path(ck.op, path);
  auto b = bwd_tensors(d, 1, lengths.has_value(), dy, dhn, x, w_ih, y, h0, y, w_hh, lengths);
  Tensor none;
  with_act(nonlinearity, [&](auto act) {
    RNNEXT_DISPATCH(y.scalar_type(), "rnn_seq_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      backward<L, cells::RNN<decltype(act)::value>>(how, bwd_pointers<scalar_t, A>(d, b, none, none, none, clip), b,
                                                    none, none);
    });
  });
  return gradients<L>(b, false);
}

// ---- layer-normalised cells -------------------------------------------------------------------------

// ln_w, ln_b [N*H]; returns them contiguous.
inline std::pair<Tensor, Tensor> check_ln(const Checks& c, const Tensor& ln_w, const Tensor& ln_b, int64_t N,
                                          const Dims& d) {
  c.shape("ln_w", ln_w, {N * d.H});
  c.shape("ln_b", ln_b, {N * d.H});
  return {ln_w.contiguous(), ln_b.contiguous()};
}

// What a layer-normalised forward saved: norm [T, B, N*H] (empty when it ran with save=False) and rstd
// [T, B, 2] in the math type.
inline void check_ln_saved(const Checks& c, const Tensor& norm, const Tensor& rstd, int64_t N, const Dims& d) {
  TORCH_CHECK(!(norm.dim() == 3 && norm.size(0) == 0 && d.T > 0), c.op,
              ": norm is empty: the forward ran with save=False, which saves nothing for backward");
  c.shape("norm", norm, {d.T, d.B, N * d.H});
  const auto acc = c.ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.sizes() == at::IntArrayRef({d.T, d.B, 2}) && rstd.scalar_type() == acc, c.op,
              ": expected rstd of dtype ", dtype_name(acc), " and shape [", d.T, ", ", d.B, ", 2], got ",
              dtype_name(rstd.scalar_type()), " ", rstd.sizes());
  TORCH_CHECK(rstd.device() == c.ref.device(), c.op, ": rstd is on ", rstd.device(), " but ", c.ref_name, " is on ",
              c.ref.device());
}

// Forward of LayerNormLSTM (c0 given) and LayerNormGRU: (y, h_n, c_n or empty, c_all or empty, norm, rstd).
template <typename L, typename Cell>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_seq(
    const char* op, const Tensor& x, const Tensor& w_ih, const Tensor& h0, const Tensor* c0, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& ln_w_, const Tensor& ln_b_, const OptTensor& lengths,
    double eps, double clip, bool save, int64_t path, const OptTensor& zoneout_mask, double zoneout) {
  const Checks ck{op, "x", x};
  const Dims d = check_seq(op, Cell::G, x, w_ih, h0, c0, w_hh, b_ih, b_hh, std::nullopt, lengths, clip);
  const auto [ln_w, ln_b] = check_ln(ck, ln_w_, ln_b_, Cell::N, d);
  TORCH_CHECK(eps > 0, op, ": expected eps > 0, got ", eps);
  const Path how = check_path(op, path);
  const auto z = check_zoneout(ck, zoneout_mask, zoneout, c0 ? 2 : 1, d, false);
  auto f = fwd_tensors(d, 0, x, w_ih, h0, w_hh, b_ih, b_hh, std::nullopt, lengths, save, c0 != nullptr);
  const int64_t Ts = save ? d.T : 0;
  auto norm = at::empty({Ts, d.B, Cell::N * d.H}, x.options());
  auto rstd = at::empty({Ts, d.B, 2}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  Tensor c;
  auto work = at::empty({d.B, 2 * d.H}, rstd.options());  // the row functors' scratch
  RNNEXT_DISPATCH(x.scalar_type(), "ln_seq", [&] {
    using S = scalar_t;
    using A = at::opmath_type<S>;
    if (c0) c = c0->to(c10::CppTypeToScalarType<A>::value, false, true, at::MemoryFormat::Contiguous);
    auto p = fwd_pointers<S, A>(d, f, c, save, z);
    p.ln_w = cptr<S>(ln_w);
    p.ln_b = cptr<S>(ln_b);
    p.eps = A(eps);
    p.ln_norm = save ? mptr<S>(norm) : nullptr;
    p.ln_rstd = save ? mptr<A>(rstd) : nullptr;
    p.ln_work = mptr<A>(work);
    forward<L, Cell>(how, p, f);
  });
  return {f.y, f.h, c0 ? c.to(x.scalar_type()) : at::empty({0}, x.options()), f.c_all, norm, rstd};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lnlstm_seq(
    const Tensor& x, const Tensor& w_ih, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& ln_w, const Tensor& ln_b, const OptTensor& lengths,
    double eps, double clip, bool save, int64_t path, const OptTensor& zoneout_mask, double zoneout) {
  return ln_seq<L, cells::LNLSTM>("lnlstm_seq", x, w_ih, h0, &c0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps, clip,
                                  save, path, zoneout_mask, zoneout);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor> lngru_seq(const Tensor& x, const Tensor& w_ih, const Tensor& h0,
                                                     const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                                     const Tensor& ln_w, const Tensor& ln_b, const OptTensor& lengths,
                                                     double eps, double clip, bool save, int64_t path,
                                                     const OptTensor& zoneout_mask, double zoneout) {
  auto [y, hn, cn, c_all, norm, rstd] = ln_seq<L, cells::LNGRU>("lngru_seq", x, w_ih, h0, nullptr, w_hh, b_ih, b_hh,
                                                                ln_w, ln_b, lengths, eps, clip, save, path,
                                                                zoneout_mask, zoneout);
  return {y, hn, norm, rstd};
}

// Backward of ln_seq: dx, dw_ih, dh0, dc0 (LSTM; else empty), dw_hh, db_ih, db_hh, dln_w, dln_b.
template <typename L, typename Cell>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_seq_backward(
    const char* op, const Tensor& dy, const Tensor& dhn, const Tensor* dcn, const Tensor& x, const Tensor& w_ih,
    const Tensor& y, const Tensor& h0, const Tensor* c0_, const Tensor* c_all_, const Tensor& norm, const Tensor& rstd,
    const Tensor& w_hh, const Tensor& ln_w_, const Tensor& ln_b_, const OptTensor& lengths, double clip, int64_t path,
    const OptTensor& zoneout_mask, double zoneout) {
  const Checks ck{op, "y", y};
  const Dims d = check_seq_backward(ck, Cell::G, false, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip);
  if (dcn) {
    ck.shape("dcn", *dcn, {d.B, d.H});
    ck.shape("c0", *c0_, {d.B, d.H});
    ck.shape("c_all", *c_all_, {d.T, d.B, d.H});
  }
  check_ln_saved(ck, norm, rstd, Cell::N, d);
  const auto [ln_w, ln_b] = check_ln(ck, ln_w_, ln_b_, Cell::N, d);
  const Path how = check_path(op, path);
  const auto z = check_zoneout(ck, zoneout_mask, zoneout, dcn ? 2 : 1, d, false);
  auto b = bwd_tensors(d, Cell::G, !dcn || lengths.has_value() || z.on(), dy, dhn, x, w_ih, y, h0, y, w_hh, lengths);
  auto c_all = c_all_ ? c_all_->contiguous() : Tensor(), c0 = c0_ ? c0_->contiguous() : Tensor();
  const auto rs = rstd.contiguous(), norm_c = norm.contiguous();
  // the row functors' scratch; each row's sums of the norms' weight and bias gradients
  auto work = at::empty({d.B, Cell::N * d.H}, rs.options()), dw = at::zeros({d.B, Cell::N * d.H}, rs.options()),
       db = at::zeros({d.B, Cell::N * d.H}, rs.options());
  Tensor dc;
  RNNEXT_DISPATCH(y.scalar_type(), "ln_seq_backward", [&] {
    using S = scalar_t;
    using A = at::opmath_type<S>;
    if (dcn) dc = dcn->to(c10::CppTypeToScalarType<A>::value, false, true, at::MemoryFormat::Contiguous);
    auto p = bwd_pointers<S, A>(d, b, c_all, c0, dc, clip, z);
    p.ln_w = cptr<S>(ln_w);
    p.ln_b = cptr<S>(ln_b);
    p.ln_norm = cptr<S>(norm_c);
    p.ln_rstd = cptr<A>(rs);
    p.ln_work = mptr<A>(work);
    p.ln_dw = mptr<A>(dw);
    p.ln_db = mptr<A>(db);
    backward<L, Cell>(how, p, b, Tensor(), Tensor());
  });
  auto [dx, dw_ih, dh0, dw_hh, db_ih, db_hh] = gradients<L>(b, Cell::separate_hg);
  return {dx, dw_ih, dh0, dcn ? dc.to(y.scalar_type()) : at::empty({0}, y.options()), dw_hh, db_ih, db_hh,
          dw.sum(0).to(y.scalar_type()), db.sum(0).to(y.scalar_type())};
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lnlstm_seq_backward(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const Tensor& w_ih, const Tensor& y,
    const Tensor& h0, const Tensor& c0, const Tensor& c_all, const Tensor& norm, const Tensor& rstd,
    const Tensor& w_hh, const Tensor& ln_w, const Tensor& ln_b, const OptTensor& lengths, double clip, int64_t path,
    const OptTensor& zoneout_mask, double zoneout) {
  return ln_seq_backward<L, cells::LNLSTM>("lnlstm_seq_backward", dy, dhn, &dcn, x, w_ih, y, h0, &c0, &c_all, norm,
                                           rstd, w_hh, ln_w, ln_b, lengths, clip, path, zoneout_mask, zoneout);
}

template <typename L>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lngru_seq_backward(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& w_ih, const Tensor& y, const Tensor& h0,
    const Tensor& norm, const Tensor& rstd, const Tensor& w_hh, const Tensor& ln_w, const Tensor& ln_b,
    const OptTensor& lengths, double clip, int64_t path, const OptTensor& zoneout_mask, double zoneout) {
  auto [dx, dw_ih, dh0, dc0, dw_hh, db_ih, db_hh, dln_w, dln_b] = ln_seq_backward<L, cells::LNGRU>(
      "lngru_seq_backward", dy, dhn, nullptr, x, w_ih, y, h0, nullptr, nullptr, norm, rstd, w_hh, ln_w, ln_b, lengths,
      clip, path, zoneout_mask, zoneout);
  return {dx, dw_ih, dh0, dw_hh, db_ih, db_hh, dln_w, dln_b};
}

}  // namespace rnnext
