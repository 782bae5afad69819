// Sequence ops (schemas in ops.cpp): for every cell of cells/all.h, <name>_seq and <name>_seq_backward, one
// layer-direction, the input projection and the whole recurrence in C++ (driver/loops.h: per step one GEMM
// hg = h @ w_hh^T and one cell kernel, which adds the biases; or the device's persistent kernel). Backward
// walks the steps in reverse; the weight gradients are GEMMs over chunks of steps. Nothing is allocated
// inside the step loops.
//
//   x        [T, B, I]    input, T >= 1, steps in order: the caller flips reverse directions (each
//                         sequence within its length)
//   w_ih     [G*H, I]     xg = x @ w_ih^T is computed here, a few steps at a time on CPU
//   w_hh     [G*H, P]     or, head-wise (k heads, not with w_hr), [G*H, H/k] (heads() below);
//                         b_ih, b_hh [G*H] (optional)
//   h0       [B, P]       P = proj_size with w_hr, else H
//   s0       [Z-1, B, H]  the other carried states (LSTM: c0; [0, B, H] for cells with one state)
//   param0, param1  the cell's PARAMS parameters (the first ones given), [PARAM_UNITS*H] each (layer norm: its
//            weight and bias)
//   w_hr     [P, H]       proj_size (cells with proj: the LSTM), optional
//   lengths  [B] int64 on x's device (optional): rows with lengths[b] <= t keep their state and output 0
//   zoneout_mask [T, B, ZONED*H] keep weights (training), optional; else zoneout: the keep weight of every
//                unit (eval's mixture), 0 = off; cells with ZONED > 0 only, not with w_hr (cells/step.h)
//   clip     BPTT clipping of h's gradient at every step (0 = off); eps: layer norm's (cells with PARAMS)
//   save     false: no backward will follow (no_grad): s_all, saved and stats come back with T = 0
//   path     0 auto, 1 per-step, 2 persistent (where the device has it and the plan fits; else per-step)
// returns
//   y        [T, B, P]    outputs;  h_n [B, P], s_n [Z-1, B, H]: the final states (the other states are
//                         carried in float for 16-bit types; the GEMM input h stays in the input type)
//   s_all    [T, Z-1, B, H] the other states after each step (0 past the end)
//   saved    [T, B, SAVED*H] what backward needs per unit (cells/<cell>.h);  stats [T, B, STATS] per row
//                         (row cells; float, double for double)
//   r        [T, B, H]    with w_hr: the cell outputs before the projection; else [0, B, H]
// Backward takes the gradients of y, h_n, s_n, the forward's inputs and outputs, and output_mask: which
// gradients to compute, in the order of the forward's tensor inputs (x, w_ih, w_hh, b_ih, b_hh, h0, s0,
// param0, param1, w_hr); those not asked for come back empty, and cost no GEMM. Backward needs the state before
// each step only where the step is within its sequence, and there it equals the previous output: h_prev[t]
// = y[t-1] (h0 at t = 0), so h is not saved.
#pragma once
#include <array>

#include "driver/loops.h"

namespace rnnext {

struct Dims {
  int64_t T, B, H, P;
};

// Head-wise recurrence: w_hh [G*H, H/k] holds the k diagonal blocks of a block-diagonal [G*H, H] (row g*H + u,
// gate g of unit u, reads the H/k units of u's head). The number of heads of w_hh's D columns, 1 for a dense
// w_hh (and with proj_size, whose w_hh reads the projected h).
inline int64_t heads(int64_t D, int64_t H, bool proj) { return !proj && D > 0 && D < H && H % D == 0 ? H / D : 1; }

// The dense [G*H, H] w_hh of a head-wise one (the driver's GEMMs run on it), and back: the head-wise part of a
// dense gradient.
inline Tensor dense_heads(const Tensor& w, int64_t H) {
  const int64_t GH = w.size(0), D = w.size(1), k = H / D, G = GH / H;
  auto dense = at::zeros({GH, H}, w.options());
  dense.view({G, k, D, k, D}).diagonal(0, 1, 3).copy_(w.view({G, k, D, D}).permute({0, 2, 3, 1}));
  return dense;
}
inline Tensor head_blocks(const Tensor& dense, int64_t D) {
  const int64_t GH = dense.size(0), H = dense.size(1), k = H / D, G = GH / H;
  return dense.view({G, k, D, k, D}).diagonal(0, 1, 3).permute({0, 3, 1, 2}).reshape({GH, D});
}

inline Path check_path(const char* op, int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, op, ": expected path 0 (auto), 1 (per-step) or 2 (persistent), got ", path);
  return static_cast<Path>(path);
}

struct Zoneout {
  Tensor mask;  // contiguous, or undefined
  double p;
  bool on() const { return mask.defined() || p > 0; }
};

// The cell's own name in messages: the op's prefix.
template <typename Cell>
std::string gates_shape() {
  return Cell::G == 1 ? "H" : std::to_string(Cell::G) + "*H";
}

// The checks of the forward and the backward alike: everything but what only one of them has. T, B, P come
// from c.ref (x forward, y backward), H from w_ih (with w_hr: its columns).
template <typename Cell, typename R = cells::RowTraits<Cell>>
Dims check_common(const Checks& c, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh, const Tensor& h0,
                  const Tensor& s0, const std::vector<Tensor>& params, const OptTensor& w_hr, const OptTensor& lengths,
                  const OptTensor& zoneout_mask, double zoneout, double clip) {
  const int64_t T = c.ref.size(0), B = c.ref.size(1);
  TORCH_CHECK(x.dim() == 3 && x.size(0) == T && x.size(1) == B, c.op, ": expected x of shape [", T, ", ", B,
              ", I], got ", x.sizes());
  c.like("x", x);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % Cell::G == 0 && w_ih.size(0) > 0 && w_ih.size(1) == x.size(2), c.op,
              ": expected w_ih of shape [", gates_shape<Cell>(), ", ", x.size(2), "], got ", w_ih.sizes());
  c.like("w_ih", w_ih);
  const int64_t H = w_ih.size(0) / Cell::G;
  TORCH_CHECK(!w_hr || Cell::proj, c.op, ": proj_size (w_hr) is not supported by this cell");
  if (w_hr) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) > 0 && w_hr->size(1) == H, c.op, ": expected w_hr of shape [P, ", H,
                "] with P > 0, got ", w_hr->sizes());
    c.like("w_hr", *w_hr);
  }
  const int64_t P = w_hr ? w_hr->size(0) : H;
  c.shape("h0", h0, {B, P});
  c.shape("s0", s0, {Cell::Z - 1, B, H});
  if (!(w_hh.dim() == 2 && w_hh.size(0) == Cell::G * H && heads(w_hh.size(1), H, w_hr.has_value()) > 1))
    c.shape("w_hh", w_hh, {Cell::G * H, P});
  c.like("w_hh", w_hh);
  TORCH_CHECK(int64_t(params.size()) == R::params, c.op, ": expected ", R::params,
              " cell parameters (param0, param1), got ", params.size());
  for (size_t i = 0; i < params.size(); ++i) c.shape(i ? "param1" : "param0", params[i], {R::param_units * H});
  c.lengths(lengths, B);
  c.clip(clip);
  TORCH_CHECK(zoneout >= 0 && zoneout <= 1, c.op, ": expected zoneout in [0, 1], got ", zoneout);
  TORCH_CHECK(Cell::ZONED > 0 || !(zoneout_mask || zoneout > 0), c.op, ": zoneout is not supported by this cell");
  if (zoneout_mask) c.shape("zoneout_mask", *zoneout_mask, {T, B, Cell::ZONED * H});
  TORCH_CHECK(!(w_hr && (zoneout_mask || zoneout > 0)), c.op, ": zoneout with proj_size is not supported");
  return {T, B, H, P};
}

inline Tensor contiguous_or_undefined(const OptTensor& t) { return t ? t->contiguous() : Tensor(); }

// The cell parameters given, param0 then param1.
inline std::vector<Tensor> given(const OptTensor& param0, const OptTensor& param1) {
  std::vector<Tensor> out;
  for (const auto* p : {&param0, &param1})
    if (*p) out.push_back(**p);
  return out;
}

// The cell's parameters, contiguous, as a launcher's pointers want them.
template <typename S>
void param_pointers(const std::vector<Tensor>& params, const S* (&out)[cells::kMaxParams]) {
  for (int i = 0; i < cells::kMaxParams; ++i) out[i] = i < int(params.size()) ? cptr<S>(params[i]) : nullptr;
}

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename L, typename Cell, typename R = cells::RowTraits<Cell>>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> seq(
    const Tensor& x, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const Tensor& h0, const Tensor& s0, const OptTensor& param0, const OptTensor& param1, const OptTensor& w_hr,
    const OptTensor& lengths, const OptTensor& zoneout_mask, double zoneout, double clip, double eps, bool save,
    int64_t path) {
  const auto params_ = given(param0, param1);
  const std::string name = std::string(Cell::name) + "_seq";
  const char* op = name.c_str();
  const Checks c{op, "x", x};
  c.dims(x, 3, "[T, B, I]");
  TORCH_CHECK(x.size(0) > 0, op, ": expected a sequence length larger than 0");
  const auto [T, B, H, P] =
      check_common<Cell>(c, x, w_ih, w_hh, h0, s0, params_, w_hr, lengths, zoneout_mask, zoneout, clip);
  if (b_ih) c.shape("b_ih", *b_ih, {Cell::G * H});
  if (b_hh) c.shape("b_hh", *b_hh, {Cell::G * H});
  TORCH_CHECK(R::params == 0 || eps > 0, op, ": expected eps > 0, got ", eps);
  const Path how = check_path(op, path);
  const auto opts = x.options();
  const int64_t Ts = save ? T : 0, Z1 = Cell::Z - 1;
  FwdTensors f{.x = x.contiguous(),
               .w_ih = w_ih.contiguous(),
               .b_ih = contiguous_or_undefined(b_ih),
               .b_hh = contiguous_or_undefined(b_hh),
               .w_hh = heads(w_hh.size(1), H, w_hr.has_value()) > 1 ? dense_heads(w_hh, H) : w_hh.contiguous(),
               .w_hr = contiguous_or_undefined(w_hr),
               .lengths = contiguous_or_undefined(lengths),
               .y = at::empty({T, B, P}, opts),
               .h = h0.clone(at::MemoryFormat::Contiguous),
               .s_all = at::empty({Ts, Z1, B, H}, opts),
               .saved = at::empty({Ts, B, Cell::SAVED * H}, opts),
               .r = at::empty({w_hr ? T : 0, B, H}, opts),
               .head = heads(w_hh.size(1), H, w_hr.has_value()) > 1 ? w_hh.size(1) : H};
  auto stats = at::empty({Ts, B, R::stats}, opts.dtype(acc_type(x.scalar_type())));
  auto work = at::empty({B, R::work_forward * H}, stats.options());
  std::vector<Tensor> params;
  for (const auto& p : params_) params.push_back(p.contiguous());
  const Zoneout z{zoneout_mask ? zoneout_mask->contiguous() : Tensor(), zoneout};
  Tensor st;  // the carried states but h, in acc_t: 16-bit types would round them at every step
  RNNEXT_DISPATCH(x.scalar_type(), "seq", [&] {
    using S = scalar_t;
    using A = at::opmath_type<S>;
    st = s0.to(c10::CppTypeToScalarType<A>::value, false, true, at::MemoryFormat::Contiguous);
    cells::SeqFwd<S, A> p{.T = T,
                          .B = B,
                          .H = H,
                          .P = P,
                          .t0 = 0,
                          .lengths = cptr<int64_t>(f.lengths),
                          .xg = nullptr,
                          .b_ih = cptr<S>(f.b_ih),
                          .b_hh = cptr<S>(f.b_hh),
                          .st = mptr<A>(st),
                          .y = mptr<S>(f.y),
                          .st_all = save && Z1 ? mptr<S>(f.s_all) : nullptr,
                          .saved = save && Cell::SAVED ? mptr<S>(f.saved) : nullptr,
                          .stats = save && R::stats ? mptr<A>(stats) : nullptr,
                          .r = w_hr ? mptr<S>(f.r) : nullptr,
                          .keep = cptr<S>(z.mask),
                          .keep_p = A(z.p),
                          .eps = A(eps),
                          .work = mptr<A>(work)};
    param_pointers<S>(params, p.param);
    forward<L, Cell>(how, p, f);
  });
  return {f.y, f.h, st.to(x.scalar_type()), f.s_all, f.saved, stats, f.r};
}

template <typename L, typename Cell, typename R = cells::RowTraits<Cell>>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> seq_backward(
    const Tensor& dy, const Tensor& dhn, const Tensor& dsn, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& h0, const Tensor& s0, const OptTensor& param0, const OptTensor& param1, const OptTensor& w_hr,
    const OptTensor& lengths, const OptTensor& zoneout_mask, double zoneout, double clip, const Tensor& y,
    const Tensor& s_all, const Tensor& saved, const Tensor& stats, const Tensor& r, int64_t path,
    std::array<bool, 10> mask) {
  const auto params_ = given(param0, param1);
  const std::string name = std::string(Cell::name) + "_seq_backward";
  const char* op = name.c_str();
  const Checks c{op, "y", y};
  c.dims(y, 3, "[T, B, P]");
  TORCH_CHECK(y.size(0) > 0, op, ": expected a sequence length larger than 0");
  const auto [T, B, H, P] =
      check_common<Cell>(c, x, w_ih, w_hh, h0, s0, params_, w_hr, lengths, zoneout_mask, zoneout, clip);
  TORCH_CHECK(P == y.size(2), op, ": expected y of shape [", T, ", ", B, ", ", P, "], got ", y.sizes());
  c.shape("dy", dy, {T, B, P});
  c.shape("dh_n", dhn, {B, P});
  c.shape("ds_n", dsn, {Cell::Z - 1, B, H});
  TORCH_CHECK(!(saved.dim() == 3 && saved.size(0) == 0), op,
              ": saved is empty: the forward ran with save=False, which saves nothing for backward");
  c.shape("saved", saved, {T, B, Cell::SAVED * H});
  c.shape("s_all", s_all, {T, Cell::Z - 1, B, H});
  const auto acc = acc_type(y.scalar_type());
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({T, B, R::stats}) && stats.scalar_type() == acc, op,
              ": expected stats of dtype ", dtype_name(acc), " and shape [", T, ", ", B, ", ", R::stats, "], got ",
              dtype_name(stats.scalar_type()), " ", stats.sizes());
  TORCH_CHECK(stats.device() == y.device(), op, ": stats is on ", stats.device(), " but y is on ", y.device());
  c.shape("r", r, {w_hr ? T : 0, B, H});
  const Path how = check_path(op, path);
  const Needs need{mask[0], mask[1], mask[2], mask[3], mask[4], mask[5], mask[6], mask[7] || mask[8], mask[9]};
  const auto opts = y.options();
  const int64_t G = Cell::G, I = x.size(2);
  const bool head_wise = heads(w_hh.size(1), H, w_hr.has_value()) > 1;
  const Zoneout z{zoneout_mask ? zoneout_mask->contiguous() : Tensor(), zoneout};
  // direct: the share of dh_prev that skips the GEMM: rows past their end, zoneout, and cells whose h_prev
  // reaches h otherwise (GRU, MinimalGRU, the layer-normalised GRU)
  const bool direct = lengths.has_value() || z.on() || Cell::reads_h_prev;
  auto e = [&](int64_t n) { return at::empty({n}, opts); };
  BwdTensors b{.dy = dy,
               .y = y.contiguous(),
               .h0 = h0.contiguous(),
               .saved = saved.contiguous(),
               .w_hh = head_wise ? dense_heads(w_hh, H) : w_hh.contiguous(),
               .x = x.contiguous(),
               .w_ih = w_ih.contiguous(),
               .lengths = contiguous_or_undefined(lengths),
               .dh = dhn.clone(at::MemoryFormat::Contiguous),
               .direct = direct ? at::empty({B, P}, opts) : Tensor(),
               .dx = need.x ? at::empty({T, B, I}, opts) : e(0),
               .dw_ih_t = need.w_ih ? at::zeros({I, G * H}, opts) : Tensor(),
               .dw_hh_t = need.w_hh ? at::zeros({P, G * H}, opts) : Tensor(),
               .db_ih = need.b_ih || (need.b_hh && !Cell::separate_hg) ? at::zeros({G * H}, opts) : Tensor(),
               .db_hh = need.b_hh && Cell::separate_hg ? at::zeros({G * H}, opts) : Tensor(),
               .need = need,
               .head = head_wise ? w_hh.size(1) : H};
  auto s_all_c = s_all.contiguous(), s0_c = s0.contiguous(), stats_c = stats.contiguous(), r_c = r.contiguous();
  auto w_hr_c = contiguous_or_undefined(w_hr);
  auto dhp = w_hr ? at::empty({T, B, P}, opts) : Tensor();
  std::vector<Tensor> params, dparams;
  for (const auto& p : params_) params.push_back(p.contiguous());
  auto work = at::empty({B, R::work_backward * H}, opts.dtype(acc));
  for (int64_t i = 0; i < R::params; ++i)
    dparams.push_back(need.params ? at::zeros({B, R::param_units * H}, opts.dtype(acc)) : Tensor());
  Tensor dst;  // carried across steps like the states: in acc_t
  RNNEXT_DISPATCH(y.scalar_type(), "seq_backward", [&] {
    using S = scalar_t;
    using A = at::opmath_type<S>;
    dst = dsn.to(c10::CppTypeToScalarType<A>::value, false, true, at::MemoryFormat::Contiguous);
    cells::SeqBwd<S, A> p{.T = T,
                          .B = B,
                          .H = H,
                          .P = P,
                          .t0 = 0,
                          .lengths = cptr<int64_t>(b.lengths),
                          .dy = cptr<S>(b.dy),
                          .y = cptr<S>(b.y),
                          .h0 = cptr<S>(b.h0),
                          .saved = cptr<S>(b.saved),
                          .st_all = cptr<S>(s_all_c),
                          .s0 = cptr<S>(s0_c),
                          .stats = cptr<A>(stats_c),
                          .dst = mptr<A>(dst),
                          .dxg = nullptr,
                          .dhg = nullptr,
                          .direct = mptr<S>(b.direct),
                          .clip = A(clip),
                          .keep = cptr<S>(z.mask),
                          .keep_p = A(z.p),
                          .work = mptr<A>(work)};
    param_pointers<S>(params, p.param);
    for (int i = 0; i < cells::kMaxParams; ++i) p.dparam[i] = i < int(dparams.size()) ? mptr<A>(dparams[i]) : nullptr;
    backward<L, Cell>(how, p, b, w_hr_c, dhp);
  });
  auto dw_hr = need.w_hr && w_hr ? at::empty({P, H}, opts) : e(0);
  if (need.w_hr && w_hr) L::gemm(dw_hr, dhp.reshape({T * B, P}).t(), r_c.reshape({T * B, H}), Tensor());
  Tensor dparam[cells::kMaxParams] = {e(0), e(0)};
  for (int i = 0; i < int(dparams.size()); ++i)
    if (mask[7 + i]) dparam[i] = dparams[i].sum(0).to(y.scalar_type());
  const auto give = [&](bool needed, const Tensor& t) { return needed ? t : e(0); };
  return {need.x ? b.dx : e(0),
          need.w_ih ? L::contiguous(b.dw_ih_t.t()) : e(0),
          need.w_hh ? (head_wise ? head_blocks(b.dw_hh_t.t(), w_hh.size(1)) : L::contiguous(b.dw_hh_t.t())) : e(0),
          give(need.b_ih, b.db_ih),
          need.b_hh ? (Cell::separate_hg ? b.db_hh : b.db_ih.clone()) : e(0),
          give(need.h0, b.dh),
          need.s0 ? dst.to(y.scalar_type()) : at::empty({0, B, H}, opts),
          dparam[0],
          dparam[1],
          dw_hr};
}

}  // namespace rnnext
