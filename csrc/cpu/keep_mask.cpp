// Zoneout's keep masks on the CPU (the op keep_mask, schema in ops.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace rnnext {
namespace {

using at::Tensor;

// Zoneout's keep masks: element i is 1 where half i % 2 (low, high) of splitmix64's output for counter
// i / 2 is below p * 2^32. Counter-based, so the threads fill their ranges independently and one draw
// from torch's generator (the seed) reproduces a mask: bernoulli_ on torch's CPU generator runs on one
// thread (docs/design.md, "Zoneout"). rnnext.reference.keep_mask is the same in PyTorch.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

Tensor keep_mask(const Tensor& seed, at::IntArrayRef size, double p, at::ScalarType dtype) {
  const auto name = [](at::ScalarType t) { return "torch." + std::string(std::get<0>(c10::getDtypeNames(t))); };
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "keep_mask: expected seed a one-element int64 CPU tensor, got shape ", seed.sizes(), ", dtype ",
              name(seed.scalar_type()), ", device ", seed.device());
  TORCH_CHECK(p >= 0 && p <= 1, "keep_mask: expected p in [0, 1], got ", p);
  TORCH_CHECK(at::isFloatingType(dtype), "keep_mask: expected a floating dtype, got ", name(dtype));
  auto out = at::empty(size, seed.options().dtype(dtype));
  const uint64_t s = uint64_t(seed.item<int64_t>()), below = uint64_t(std::ldexp(p, 32));  // p = 1: 2^32
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "keep_mask", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (n + 1) / 2, 1 << 14, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < std::min(k1, n / 2); ++k) {
        const uint64_t r = splitmix64(s + uint64_t(k) * 0x9E3779B97F4A7C15ull);
        o[2 * k] = scalar_t((r & 0xFFFFFFFFull) < below);
        o[2 * k + 1] = scalar_t((r >> 32) < below);
      }
      if (n % 2 && k1 == (n + 1) / 2)
        o[n - 1] = scalar_t((splitmix64(s + uint64_t(n / 2) * 0x9E3779B97F4A7C15ull) & 0xFFFFFFFFull) < below);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) { m.impl("keep_mask", &keep_mask); }

}  // namespace rnnext
