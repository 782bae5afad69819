// Host-side helpers shared by the cell ops and the sequence driver: checks, dtype dispatch, pointers.
// Launchers (cpu/kernels.cpp, cuda/kernels.cu) provide
//   template <typename F> static void run(c10::Device device, int64_t B, int64_t H, const F& f);
// which calls f.apply<V>(b, j) over a [B, H] grid (cells/step.h), on the device's current stream.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "cells/step.h"

namespace rnnext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define RNNEXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but xg is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but xg has dtype ", ref.scalar_type());
}

inline void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape, const Tensor& ref) {
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  check_like(op, name, t, ref);
}

inline cells::Act parse_act(std::string_view nonlinearity) {
  if (nonlinearity == "tanh") return cells::Act::Tanh;
  TORCH_CHECK(nonlinearity == "relu", "Unknown nonlinearity: ", nonlinearity);
  return cells::Act::Relu;
}

// Calls fn(std::integral_constant<cells::Act, A>) for the runtime activation.
template <typename Fn>
void with_act(std::string_view nonlinearity, const Fn& fn) {
  if (parse_act(nonlinearity) == cells::Act::Tanh)
    fn(std::integral_constant<cells::Act, cells::Act::Tanh>{});
  else
    fn(std::integral_constant<cells::Act, cells::Act::Relu>{});
}

template <typename T>
const T* cptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mptr(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace rnnext
