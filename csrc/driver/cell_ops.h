// Single-step cell ops (schemas in ops.cpp): one cells/step.h kernel on precomputed projections, for every
// element cell of cells/all.h.
//   xg, hg [B, G*H] (biases included); h [B, H], s [Z-1, B, H]: the states before the step
//   -> h_new [B, H], s_new [Z-1, B, H], saved [B, SAVED*H]
//   backward: dh_new, ds_new the gradients of h_new, s_new; h_new the step's output (cells that read it)
//   -> dgates [B, G*H] (the pre-activations' gradients: xg's, and hg's the same; cells whose hg has its own:
//      [B, 2*G*H], xg's then hg's), dh [B, H] (h's but through hg), ds [Z-1, B, H]
// The states are tensors of the input type here (the sequence ops carry 16-bit types' states in float).
#pragma once
#include "driver/common.h"

namespace rnnext {

template <typename Cell>
int64_t check_cell(const Checks& c, const Tensor& gates, int64_t width, const Tensor& h, const Tensor& s) {
  c.dims(gates, 2, width == 1 ? "[B, H]" : "[B, " + std::to_string(width) + "*H]");
  TORCH_CHECK(gates.size(1) % width == 0, c.op, ": ", c.ref_name, ".size(1) = ", gates.size(1),
              " is not a multiple of ", width);
  const int64_t B = gates.size(0), H = gates.size(1) / width;
  c.shape("h", h, {B, H});
  c.shape("s", s, {Cell::Z - 1, B, H});
  return H;
}

template <typename L, typename Cell>
std::tuple<Tensor, Tensor, Tensor> cell_step(const Tensor& xg, const Tensor& hg, const Tensor& h, const Tensor& s) {
  const std::string name = std::string(Cell::name) + "_cell";
  const Checks c{name.c_str(), "xg", xg};
  const int64_t H = check_cell<Cell>(c, xg, Cell::G, h, s), B = xg.size(0);
  c.shape("hg", hg, xg.sizes());
  auto x = xg.contiguous(), g = hg.contiguous(), h0 = h.contiguous(), s0 = s.contiguous();
  auto h1 = at::empty_like(h0), s1 = at::empty_like(s0), saved = at::empty({B, Cell::SAVED * H}, x.options());
  RNNEXT_DISPATCH(xg.scalar_type(), "cell", [&] {
    using S = scalar_t;
    L::run(xg.device(), B, H,
           cells::Forward<Cell, S, at::opmath_type<S>, S>{.step = {nullptr, 0, H},
                                                          .xg = cptr<S>(x),
                                                          .hg = cptr<S>(g),
                                                          .h_prev = cptr<S>(h0),
                                                          .st_prev = cptr<S>(s0),
                                                          .st = mptr<S>(s1),
                                                          .y = mptr<S>(h1),
                                                          .saved = mptr<S>(saved),
                                                          .plane = B * H});
  });
  return {h1, s1, saved};
}

template <typename L, typename Cell>
std::tuple<Tensor, Tensor, Tensor> cell_step_backward(const Tensor& dh_new, const Tensor& ds_new, const Tensor& h,
                                                      const Tensor& s, const Tensor& h_new, const Tensor& saved) {
  const std::string name = std::string(Cell::name) + "_cell_backward";
  const Checks c{name.c_str(), "dh_new", dh_new};
  c.dims(dh_new, 2, "[B, H]");
  const int64_t B = dh_new.size(0), H = dh_new.size(1);
  c.shape("saved", saved, {B, Cell::SAVED * H});
  c.shape("ds_new", ds_new, {Cell::Z - 1, B, H});
  c.shape("h", h, {B, H});
  c.shape("s", s, {Cell::Z - 1, B, H});
  c.shape("h_new", h_new, {B, H});
  const int64_t width = (Cell::separate_hg ? 2 : 1) * Cell::G * H;
  auto dh1 = dh_new.contiguous(), h0 = h.contiguous(), s0 = s.contiguous(), h1 = h_new.contiguous(),
       sv = saved.contiguous();
  auto dgates = at::empty({B, width}, sv.options()), dh = at::empty_like(h0),
       ds = ds_new.clone(at::MemoryFormat::Contiguous);
  RNNEXT_DISPATCH(saved.scalar_type(), "cell_backward", [&] {
    using S = scalar_t;
    S* d = mptr<S>(dgates);
    L::run(saved.device(), B, H,
           cells::Backward<Cell, S, at::opmath_type<S>, S>{.step = {nullptr, 0, H},
                                                           .dh_next = cptr<S>(dh1),
                                                           .saved = cptr<S>(sv),
                                                           .h_prev = cptr<S>(h0),
                                                           .st_prev = cptr<S>(s0),
                                                           .out = cptr<S>(h1),
                                                           .dst = mptr<S>(ds),
                                                           .dxg = d,
                                                           .dhg = Cell::separate_hg ? d + Cell::G * H : d,
                                                           .direct = mptr<S>(dh),
                                                           .ldg = width,
                                                           .plane = B * H});
  });
  return {dgates, dh, ds};
}

}  // namespace rnnext
