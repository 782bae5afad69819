// The CPU's kernels of every op (driver/register.h over cpu/launcher.h), the GEMM ops for tests (schemas in
// ops.cpp) and the emulation's status check.
#include "cpu/launcher.h"
#include "driver/register.h"

#include <string>
#include <tuple>

namespace rnnext {

namespace {

std::tuple<std::string, bool> cpu_gemm_path(at::ScalarType dtype) {
  const bool can = at::native::cpublas::could_pack(dtype);
  if (packed::use(dtype)) return {"packed", can};
  return {dtype == at::kFloat && have_brgemm() ? "brgemm" : "aten", can};
}

bool set_cpu_packed(bool allowed) { return packed::allowed().exchange(allowed); }

// how: "gemm" CpuLauncher::gemm(a, b), "weight" with b through right_operand first, "emulated" the packed path's
// tiling and padding around packed::Emulated's kernels.
Tensor cpu_gemm(const Tensor& a, const Tensor& b, const OptTensor& add, c10::string_view how) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && a.scalar_type() == b.scalar_type(),
              "cpu_gemm: expected a [M, K] and b [K, N] of one dtype, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(!add || (add->sizes() == at::IntArrayRef{a.size(0), b.size(1)} && add->scalar_type() == a.scalar_type()),
              "cpu_gemm: expected add [M, N] of a's dtype");
  TORCH_CHECK(how == "gemm" || how == "weight" || (how == "emulated" && at::isReducedFloatingType(a.scalar_type())),
              "cpu_gemm: expected how gemm, weight or (16-bit) emulated, got ", how);
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  const Tensor plus = add ? *add : Tensor();
  if (how == "emulated")
    packed::gemm<packed::Emulated>(out, a, packed::pack<packed::Emulated>(b), plus);
  else
    CpuLauncher::gemm(out, a, how == "weight" ? CpuLauncher::right_operand(b) : b, plus);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  register_ops<CpuLauncher>(m);
  m.impl("cpu_gemm", &cpu_gemm);
}

// No tensor arguments: no backend to dispatch on.
TORCH_LIBRARY_IMPL(rnnext, CompositeImplicitAutograd, m) {
  m.impl("cpu_gemm_path", &cpu_gemm_path);
  m.impl("set_cpu_packed", &set_cpu_packed);
}

static const bool emulation_status_added = persistent::add_status_check(&emulated::check);

}  // namespace rnnext
