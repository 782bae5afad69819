// Host-side helpers shared by the cell ops and the sequence driver: checks, dtype dispatch, pointers.
// Launchers (cpu/launcher.h, cuda/kernels.cu) provide
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
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "cells/seq_args.h"

namespace rnnext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define RNNEXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Argument checks. Messages name dtypes and devices as Python prints them: the fake kernels in
// rnnext/_fake.py raise the same messages, in the same order (tests/test_checks.py compares them).
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Every tensor of an op is checked against one reference tensor (x in forward, y in backward),
// which fixes the device and dtype of all of them.
struct Checks {
  const char* op;
  const char* ref_name;
  const Tensor& ref;

  void dims(const Tensor& t, int64_t n, const std::string& shape) const {
    TORCH_CHECK(t.dim() == n, op, ": expected ", ref_name, " of shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": expected ", ref_name,
                " of dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16, got ",
                dtype_name(t.scalar_type()));
  }
  void like(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                ref.device());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", dtype_name(t.scalar_type()),
                " but ", ref_name, " has dtype ", dtype_name(ref.scalar_type()));
  }
  void shape(const char* name, const Tensor& t, at::IntArrayRef s) const {
    TORCH_CHECK(t.sizes() == s, op, ": expected ", name, " of shape ", s, ", got ", t.sizes());
    like(name, t);
  }
  // lengths [B] int64 on ref's device. Its values need no check: the kernels only compare them with t.
  void lengths(const OptTensor& l, int64_t B) const {
    if (!l) return;
    TORCH_CHECK(l->dim() == 1 && l->size(0) == B && l->scalar_type() == at::kLong, op,
                ": expected lengths of dtype torch.int64 and shape [", B, "], got ", dtype_name(l->scalar_type()), " ",
                l->sizes());
    TORCH_CHECK(l->device() == ref.device(), op, ": lengths is on ", l->device(), " but ", ref_name, " is on ",
                ref.device());
  }
  void clip(double v) const { TORCH_CHECK(v >= 0, op, ": expected clip >= 0 (0 = off), got ", v); }
};

template <typename T>
const T* cptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mptr(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace rnnext
