// The persistent CUDA kernels' per-CTA code (persistent/cta.h) run on the CPU: every CTA's 256 threads, phase
// after phase as the kernels separate them with block syncs, each warp-wide MMA over the warp's 32 register
// sets, the CTAs of a step in an order the device could also take (the grid barrier split into its arrival
// and its wait: a CTA's stores after its arrival run after the other CTAs' next step). Planned for an H100
// with 8 SMs, so that small problems split over several CTAs and slightly larger ones do not fit.
//
// It exists to test that code, not to be fast: it runs only when a test asks for it, through
// RNNEXT_TEST_EMULATE_PERSISTENT, a comma-separated list of
//   1        run where the persistent path is asked for (path 2)
//   default  also as the CPU's default (path 0), as on a device whose default is the persistent kernel
//   fail     plan as usual, but the launch "fails" (the driver's fallback to the per-step path)
//   timeout  the first grid barrier "times out" (NaN outputs; the next launch or check_persistent raises; local
//            plans have none)
//   reverse  each phase's threads and each step's CTAs in reverse order (a race between threads of a phase
//            shows as results that depend on the order)
//   sms=N    N SMs instead of 8 (an H100 has 132)
// Unset: never (users of the "persistent" backend on CPU get the per-step loop).
#pragma once
#include <ATen/Context.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "driver/loops.h"
#include "persistent/plan.h"
#include "persistent/status.h"

namespace rnnext {
namespace emulated {

struct Settings {
  bool on = false, by_default = false, fail = false, timeout = false, reverse = false;
  int64_t sms = 8;
};

inline Settings settings() {
  Settings s;
  const char* v = std::getenv("RNNEXT_TEST_EMULATE_PERSISTENT");
  const std::string all = v ? v : "";
  size_t i = 0;
  while (i < all.size()) {
    const size_t j = std::min(all.find(',', i), all.size());
    const std::string w = all.substr(i, j - i);
    s.on |= w == "1" || w == "default" || w == "fail" || w == "timeout" || w == "reverse";
    s.by_default |= w == "default";
    s.fail |= w == "fail";
    s.timeout |= w == "timeout";
    s.reverse |= w == "reverse";
    if (w.rfind("sms=", 0) == 0) s.sms = std::max<int64_t>(1, std::atoll(w.c_str() + 4));
    i = j + 1;
  }
  return s;
}

// An H100's shared memory and compute capability, with the settings' SMs.
inline persistent::Capacity device(const Settings& s) { return {.sms = s.sms, .smem_per_block = 232448, .arch = 90}; }

inline int& error_word() {
  static int word = 0;
  return word;
}
inline void check() { persistent::raise_if_failed(&error_word()); }

template <typename S>
bool has_mma() {
  if constexpr (persistent::mma_of<S> == persistent::Mma::None) return false;
  if constexpr (std::is_same_v<S, float>) return at::globalContext().allowTF32CuBLAS();
  return true;
}

// f(tid) for a CTA's threads in the order the settings ask for.
template <typename F>
void threads(const Settings& s, const F& f) {
  for (int i = 0; i < persistent::kThreads; ++i) f(s.reverse ? persistent::kThreads - 1 - i : i);
}
template <typename F>
void warps(const Settings& s, const F& f) {
  for (int i = 0; i < persistent::kWarps; ++i) f(32 * (s.reverse ? persistent::kWarps - 1 - i : i));
}
// CTAs in descending order (ascending when reversed): each step's interleaving runs a CTA's work after the
// next step's of the CTAs above it.
template <typename F>
void ctas(const Settings& s, int32_t n, const F& f) {
  for (int32_t i = 0; i < n; ++i) f(s.reverse ? i : n - 1 - i);
}

template <typename Cell, typename S, typename A>
bool forward(Path path, const cells::SeqFwd<S, A>& p, const Tensor& w_hh, int64_t head, Tensor& h) {
  using namespace persistent;
  if constexpr (mma_of<S> == Mma::None) {
    return false;
  } else {
    const Settings set = settings();
    if (!set.on || !use_persistent(path, set.by_default) || !has_mma<S>()) return false;
    const Plan pl =
        make_plan(Dir::Forward, Cell::G, p.B, p.H, sizeof(S), mma_of<S>, forward_parts<Cell>(), device(set), head);
    if (!pl.fits || set.fail) return false;
    check();
    RECORD_FUNCTION("rnnext::persistent_forward", std::vector<c10::IValue>());
    using CTA = ForwardCTA<Cell, S, A>;
    std::vector<unsigned char> smem(size_t(pl.ctas) * pl.smem);
    std::vector<typename CTA::Regs> regs(size_t(pl.ctas) * kThreads);
    auto buf0 = at::empty_like(h), buf1 = at::empty_like(h);
    const Grid grid{nullptr, &error_word(), (unsigned long long)pl.ctas, 0};
    std::vector<CTA> cta;
    for (int32_t k = 0; k < pl.ctas; ++k)
      cta.push_back(CTA{pl, p, k, smem.data() + size_t(k) * pl.smem, cptr<S>(w_hh), cptr<S>(h), mptr<S>(buf0),
                        mptr<S>(buf1), mptr<S>(h), grid});
    auto reg = [&](int32_t k, int tid) -> typename CTA::Regs& { return regs[size_t(k) * kThreads + tid]; };
    for (int32_t k = 0; k < pl.ctas; ++k)
      threads(set, [&](int tid) {
        cta[k].prologue(reg(k, tid), tid);
        cta[k].prefetch(0, tid);
      });
    auto until_arrival = [&](int32_t k, int32_t t) {
      threads(set, [&](int tid) { cta[k].stage(t, tid); });
      warps(set, [&](int tid) { cta[k].template multiply<32>(&reg(k, tid), tid); });
      threads(set, [&](int tid) { cta[k].cell(reg(k, tid), t); });
    };
    auto after_arrival = [&](int32_t k, int32_t t) {
      threads(set, [&](int tid) {
        cta[k].store(t, tid);
        cta[k].prefetch(t + 1, tid);
      });
    };
    for (int32_t t = 0; t < p.T; ++t) {
      if (set.timeout && t == 1 && !pl.local) {  // the wait for step 0's arrivals gives up
        error_word() = 1;
        ctas(set, pl.ctas, [&](int32_t k) {
          after_arrival(k, 0);
          threads(set, [&](int tid) { cta[k].poison(tid); });
        });
        return true;
      }
      ctas(set, pl.ctas, [&](int32_t k) {
        if (t > 0) after_arrival(k, t - 1);
        until_arrival(k, t);
      });
    }
    ctas(set, pl.ctas, [&](int32_t k) {
      after_arrival(k, p.T - 1);
      threads(set, [&](int tid) { cta[k].epilogue(reg(k, tid)); });
    });
    return true;
  }
}

template <typename Cell, typename S, typename A>
bool backward(Path path, const cells::SeqBwd<S, A>& p, const Tensor& w_hh, int64_t head, Tensor& dh) {
  using namespace persistent;
  if constexpr (mma_of<S> == Mma::None) {
    return false;
  } else {
    const Settings set = settings();
    if (!set.on || !use_persistent(path, set.by_default) || !has_mma<S>()) return false;
    const Plan pl =
        make_plan(Dir::Backward, Cell::G, p.B, p.H, sizeof(S), mma_of<S>, backward_parts<Cell>(), device(set), head);
    if (!pl.fits || set.fail) return false;
    check();
    RECORD_FUNCTION("rnnext::persistent_backward", std::vector<c10::IValue>());
    using CTA = BackwardCTA<Cell, S, A>;
    std::vector<unsigned char> smem(size_t(pl.ctas) * pl.smem);
    std::vector<typename CTA::Regs> regs(size_t(pl.ctas) * kThreads);
    const Grid grid{nullptr, &error_word(), (unsigned long long)pl.ctas, 0};
    std::vector<CTA> cta;
    for (int32_t k = 0; k < pl.ctas; ++k)
      cta.push_back(CTA{pl, p, k, smem.data() + size_t(k) * pl.smem, cptr<S>(w_hh), mptr<S>(dh), grid});
    auto reg = [&](int32_t k, int tid) -> typename CTA::Regs& { return regs[size_t(k) * kThreads + tid]; };
    for (int32_t k = 0; k < pl.ctas; ++k)
      threads(set, [&](int tid) {
        cta[k].prologue(reg(k, tid), tid);
        cta[k].prefetch(p.T - 1, tid);
      });
    for (int32_t k = 0; k < pl.ctas; ++k) threads(set, [&](int tid) { cta[k].cell(reg(k, tid), p.T - 1); });
    for (int32_t t = p.T - 1; t >= 0; --t) {
      if (set.timeout && t == p.T - 1 && !pl.local) {  // the first wait gives up
        error_word() = 1;
        ctas(set, pl.ctas, [&](int32_t k) {
          threads(set, [&](int tid) {
            cta[k].prefetch(t - 1, tid);
            cta[k].poison(tid);
          });
        });
        return true;
      }
      // After every CTA's cell of step t: each CTA's GEMM of step t, then (not waiting for the others) its
      // cell of step t - 1.
      ctas(set, pl.ctas, [&](int32_t k) {
        threads(set, [&](int tid) {
          cta[k].prefetch(t - 1, tid);
          cta[k].stage(t, tid);
        });
        warps(set, [&](int tid) { cta[k].template multiply<32>(&reg(k, tid), tid); });
        threads(set, [&](int tid) { cta[k].gather(reg(k, tid)); });
        if (t > 0) threads(set, [&](int tid) { cta[k].cell(reg(k, tid), t - 1); });
      });
    }
    for (int32_t k = 0; k < pl.ctas; ++k) threads(set, [&](int tid) { cta[k].epilogue(reg(k, tid)); });
    return true;
  }
}

}  // namespace emulated
}  // namespace rnnext
