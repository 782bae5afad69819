// The CPU launcher (driver/loops.h's contract): the cell functors over rows in parallel, each row's columns in
// vectors then scalars (cpu/vec.h); the GEMMs through brgemm (cpu/gemm.h; 16-bit on AMX with a packed B,
// cpu/packed.h); a chunk of steps as one OpenMP region; the persistent path only as the tests' emulation
// (cpu/emulation.h).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <omp.h>

#include <algorithm>
#include <type_traits>

#include "cpu/emulation.h"
#include "cpu/gemm.h"
#include "cpu/packed.h"
#include "cpu/vec.h"
#include "driver/loops.h"

namespace rnnext {

struct CpuLauncher {
  // A few steps of xg (and of its gradient) at a time: ~1 MB, what a core's L2 holds, but at least 512
  // rows: the weight gradients' GEMMs (K = the chunk's rows) accumulate into [I or H, G*H] once per chunk,
  // and with fewer rows that traffic dominates (docs/design.md).
  static int64_t chunk_steps(int64_t B, int64_t GH, int64_t elem) {
    B = std::max<int64_t>(1, B);
    return std::max((int64_t(1) << 20) / std::max<int64_t>(1, B * GH * elem), (512 + B - 1) / B);
  }
  static bool wants_persistent(Path path) {
    const auto s = emulated::settings();  // only the tests' emulation: cpu/emulation.h
    return s.on && use_persistent(path, s.by_default);
  }
  static Tensor contiguous(const Tensor& m) { return rnnext::contiguous(m); }
  // float in panels (cpu/gemm.h); 16-bit where AMX packs: packed (cpu/packed.h). gemm recognises either by its
  // three dimensions.
  static Tensor right_operand(const Tensor& m) {
    if (m.scalar_type() == at::kFloat && m.numel() > 0 && have_brgemm()) return pack_panels(m);
    return packed::use(m.scalar_type()) ? packed::pack(m) : rnnext::contiguous(m);
  }
  // Float rows padded: padded_row (cpu/gemm.h).
  static int64_t gate_stride(int64_t GH, at::ScalarType type) { return type == at::kFloat ? padded_row(GH) : GH; }

  static void gemm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& add) {
    if (b.dim() == 3 && b.scalar_type() == at::kFloat) {  // right_operand's panels
      TORCH_INTERNAL_ASSERT(out.stride(1) == 1);
      if (out.numel() > 0) brgemm_gemm(out, a, b, add);  // no rows: nothing to write
      return;
    }
    if (b.dim() == 3) return packed::gemm(out, a, b, add);  // right_operand's or step_weights' packed weight
    if (packed::per_call(out, a)) return packed::gemm(out, a, packed::pack(b), add);
    if (out.scalar_type() == at::kFloat && out.stride(1) == 1 && out.numel() > 0 && a.size(1) > 0 && have_brgemm())
      brgemm_gemm(out, a, b, add);
    else
      aten_gemm(out, a, b, add);
  }

  template <typename Cell, typename S, typename A>
  static bool persistent_forward(Path path, const cells::SeqFwd<S, A>& p, const Tensor& w_hh, int64_t head, Tensor& h) {
    return emulated::forward<Cell>(path, p, w_hh, head, h);
  }
  template <typename Cell, typename S, typename A>
  static bool persistent_backward(Path path, const cells::SeqBwd<S, A>& p, const Tensor& w_hh, int64_t head,
                                  Tensor& dh) {
    return emulated::backward<Cell>(path, p, w_hh, head, dh);
  }

  // f over row b, columns [j0, j1): pairs of vectors of the math type (float for 16-bit types; cpu/vec.h says
  // why pairs), a vector, then scalars.
  template <typename F>
  static void apply_row(const F& f, int64_t b, int64_t j0, int64_t j1) {
    using V = at::vec::Vectorized<typename F::acc>;
    using V2 = at::vec::VectorizedN<typename F::acc, 2>;
    int64_t j = j0;
    for (; j + V2::size() <= j1; j += V2::size()) f.template apply<V2>(b, j);
    for (; j + V::size() <= j1; j += V::size()) f.template apply<V>(b, j);
    for (; j < j1; ++j) f.template apply<typename F::acc>(b, j);
  }

  // cells/layernorm.h's row executor: one thread per row, its loops in vectors, then scalars.
  struct VecRow {
    template <typename A, typename Fn>
    void loop(int64_t n, const Fn& fn) const {
      using V = at::vec::Vectorized<A>;
      int64_t k = 0;
      for (; k + V::size() <= n; k += V::size()) fn.template operator()<V>(k);
      for (; k < n; ++k) fn.template operator()<A>(k);
    }
    template <typename A, int M, typename Fn>
    cells::Sums<A, M> sums(int64_t n, const Fn& fn) const {
      using V = at::vec::Vectorized<A>;
      V acc[M];
      A tail[M];
      for (int m = 0; m < M; ++m) acc[m] = V(A(0)), tail[m] = A(0);
      int64_t k = 0;
      for (; k + V::size() <= n; k += V::size()) fn.template operator()<V>(k, acc);
      for (; k < n; ++k) fn.template operator()<A>(k, tail);
      cells::Sums<A, M> out;
      for (int m = 0; m < M; ++m) out.v[m] = cells::Lanes<V>::sum(acc[m]) + tail[m];
      return out;
    }
  };

  template <typename F>
  static void run_rows(c10::Device, int64_t B, const F& f) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f.row(b, VecRow{});
    });
  }

  template <typename F>
  static void run(c10::Device, int64_t B, int64_t H, const F& f) {
    // Rows per task: enough work to pay for waking a thread (the cells cost ~1-4 ns per element).
    const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(H, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) apply_row(f, b, 0, H);
    });
  }

  // The forward's hidden units split over the threads: blocks of `units` (a multiple of 16).
  static std::pair<int64_t, int64_t> unit_blocks(int64_t H) {
    const int64_t threads = at::get_num_threads();
    const int64_t units = ((H + threads - 1) / threads + 15) / 16 * 16;
    return {units, (H + units - 1) / units};
  }
  // W_hh^T [K, G*H] as each thread reads it in the fused regions: [blocks, G, panels * K, kPanel] float, a
  // block's units of each gate in panels (cpu/gemm.h), its gates contiguous (4-D: the steps run fused; else
  // w_t for gemm step by step, packed where AMX packs 16-bit).
  // Read in place, a gate's columns are rows 4*H floats apart, 4 KB at H = 256: they thrash the L1 sets. Fused:
  // float; 16-bit with the GEMM in float where the step GEMM is small (up to 2^24 multiply-adds; above, oneDNN's
  // bf16 GEMM per step is faster: docs/design.md).
  static Tensor step_weights(const Tensor& w_t, int64_t G, int64_t H, int64_t B) {
    const auto type = w_t.scalar_type();
    const int64_t K = w_t.size(0);
    const bool small = B * K * G * H <= (int64_t(1) << 24);
    if (!(type == at::kFloat || (small && at::isReducedFloatingType(type))) || K == 0 || H == 0 || !have_brgemm())
      return packed::use(type) ? packed::pack(w_t) : rnnext::contiguous(w_t);
    const auto [units, blocks] = unit_blocks(H);
    auto fused = at::zeros({blocks, G, (units + kPanel - 1) / kPanel * K, kPanel}, w_t.options().dtype(at::kFloat));
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t j0 = blk * units, n = std::min(H, j0 + units) - j0;
        const auto panels = pack_panels(w_t.narrow(1, g * H + j0, n).to(at::kFloat));
        fused[blk][g].narrow(0, 0, panels.size(0) * K).copy_(panels.view({-1, kPanel}));
      }
    return fused;
  }

  // The unit blocks an OpenMP thread of a fused region owns, the same at every step (it reads back what
  // it wrote): block k on thread k, or round robin where OpenMP gave the region fewer threads.
  struct Blocks {
    int64_t units, blocks, H, thread = omp_get_thread_num(), team = omp_get_num_threads();
    template <typename F>
    void each(const F& f) const {
      for (int64_t blk = thread; blk < blocks; blk += team) f(blk, blk * units, std::min(H, blk * units + units));
    }
  };

  // Block blk's part of a fused step's cell: its hidden units of every row, or (Rows) its rows whole.
  template <bool Rows, typename F>
  static void cell_part(const F& f, int64_t B, int64_t blk, int64_t blocks, int64_t j0, int64_t j1) {
    if constexpr (Rows) {
      for (int64_t r = B * blk / blocks; r < B * (blk + 1) / blocks; ++r) f.row(r, VecRow{});
    } else {
      for (int64_t r = 0; r < B; ++r) apply_row(f, r, j0, j1);
    }
  }

  // A fused region's GEMM operand in float: 16-bit src converted into thread blk's slice of buf; float as is.
  template <typename S>
  static const float* as_float(const S* src, const Tensor& buf, int64_t blk, int64_t n) {
    if constexpr (std::is_same_v<S, float>) {
      return src;
    } else {
      float* a = buf.mutable_data_ptr<float>() + blk * n;
      at::vec::convert(src, a, n);
      return a;
    }
  }
  // Columns [j0, j1) of B rows (row stride ld) of a float GEMM's output rounded into the 16-bit result.
  template <typename S>
  static void columns_back(const float* src, S* dst, int64_t B, int64_t ld, int64_t j0, int64_t j1) {
    if constexpr (!std::is_same_v<S, float>)
      for (int64_t r = 0; r < B; ++r) at::vec::convert(src + r * ld + j0, dst + r * ld + j0, j1 - j0);
  }

  // Steps t0..t1-1 of the forward (see driver/loops.h). Packed weights: one parallel region for all of
  // them, each thread the GEMM of its hidden units' gate columns then the cell on them while they are in
  // cache, a barrier between steps (cheaper than a fork/join per step). Rows: the cell needs every column
  // of its rows, a barrier before it too.
  // 16-bit S: the GEMM in float (the products of 16-bit values are exact in float, as in a 16-bit GEMM
  // with float accumulation, and hg is rounded back to S as such a GEMM's output is): each thread converts
  // h_{t-1} for itself and its columns of hg back. double: never packed (step_weights), its region not
  // compiled.
  // The heads of `head` units that units [j0, j1) meet: f(u0, u1, k0), [u0, u1) the units of the head that starts
  // at unit k0 (head = H: the one dense head).
  template <typename F>
  static void each_head(int64_t j0, int64_t j1, int64_t head, const F& f) {
    for (int64_t k0 = j0 / head * head; k0 < j1; k0 += head) f(std::max(j0, k0), std::min(j1, k0 + head), k0);
  }

  template <bool Rows, typename S, typename MakeF>
  static void gemm_cell_steps(int64_t t0, int64_t t1, Tensor& hg, const Tensor& h, const Tensor& other,
                              const Tensor& w_step, int64_t H, int64_t head, const MakeF& make_f) {
    if (h.size(0) == 0) return;
    if (std::is_same_v<S, double> || w_step.dim() != 4)
      return gemm_cell_each_step<CpuLauncher, Rows>(t0, t1, hg, h, other, w_step, H, head, make_f);
    if constexpr (!std::is_same_v<S, double>) {
      constexpr bool to_float = !std::is_same_v<S, float>;
      const int64_t B = h.size(0), K = h.size(1), GH = hg.size(1), G = GH / H;
      const auto [units, blocks] = unit_blocks(H);
      const int64_t panels = (units + kPanel - 1) / kPanel, pstride = K * kPanel;
      const auto fopts = h.options().dtype(at::kFloat);
      const Tensor hf = to_float ? at::empty({blocks, B, K}, fopts) : Tensor(),
                   hgf = to_float ? at::empty({B, GH}, fopts) : hg;
      const float* W = w_step.const_data_ptr<float>();
      float* C = hgf.mutable_data_ptr<float>();
      S* out = hg.mutable_data_ptr<S>();
#pragma omp parallel num_threads(blocks)
      {
        const Blocks mine{units, blocks, H};
        for (int64_t t = t0; t < t1; ++t) {
          const Tensor& prev = t % 2 ? other : h;
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) {
            const float* A = as_float(prev.const_data_ptr<S>(), hf, blk, B * K);
            for (int64_t g = 0; g < G; ++g) {
              const float* Wg = W + (blk * G + g) * pstride * panels;  // head-wise: only the diagonal blocks' rows
              each_head(j0, j1, head, [&](int64_t u0, int64_t u1, int64_t k0) {
                panel_blocks(B, u1 - u0, head == H ? K : head, K, GH, false, A + k0, Wg + k0 * kPanel, pstride, u0 - j0,
                             C + g * H + u0);
              });
              columns_back(C + g * H, out + g * H, B, GH, j0, j1);
            }
          });
          if constexpr (Rows) {
#pragma omp barrier
          }
          const auto f = make_f(t, prev, t % 2 ? h : other);
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) { cell_part<Rows>(f, B, blk, blocks, j0, j1); });
#pragma omp barrier
        }
      }
    }
  }

  // Steps t1-1 down to t0 of the backward (see driver/loops.h). Packed weights: one parallel region, each
  // thread the cell of its hidden units, a barrier, then the same units' columns of dh = direct + dhg @ w_hh:
  // the dh and direct each thread's cell reads are what it wrote itself. Rows: a cell reads every column
  // of its rows of dh, a barrier after the GEMM too. 16-bit S: the GEMM in float as in the forward.
  template <bool Rows, typename S, typename MakeF>
  static void cell_gemm_steps(int64_t t0, int64_t t1, Tensor& dh, const Tensor& dhg, const Tensor& direct,
                              const Tensor& w_step, int64_t H, int64_t head, bool to_h0, const MakeF& make_f) {
    if (dh.size(0) == 0) return;
    if (std::is_same_v<S, double> || w_step.dim() != 4)
      return cell_gemm_each_step<CpuLauncher, Rows>(t0, t1, dh, dhg, direct, w_step, H, head, to_h0, make_f);
    if constexpr (!std::is_same_v<S, double>) {
      constexpr bool to_float = !std::is_same_v<S, float>;
      const int64_t B = dh.size(0), K = dhg.size(2), ld = dhg.stride(1);
      const auto [units, blocks] = unit_blocks(H);
      const int64_t panels = (units + kPanel - 1) / kPanel, pstride = K * kPanel;
      const auto fopts = dh.options().dtype(at::kFloat);
      const Tensor dgf = to_float ? at::empty({blocks, B, ld}, fopts) : Tensor(),
                   dhf = to_float ? at::empty({B, H}, fopts) : dh;
      const float* W = w_step.const_data_ptr<float>();
      const S *D = dhg.const_data_ptr<S>(), *R = direct.defined() ? direct.const_data_ptr<S>() : nullptr;
      float* C = dhf.mutable_data_ptr<float>();
      S* out = dh.mutable_data_ptr<S>();
#pragma omp parallel num_threads(blocks)
      {
        const Blocks mine{units, blocks, H};
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const auto f = make_f(t);
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) { cell_part<Rows>(f, B, blk, blocks, j0, j1); });
#pragma omp barrier
          if (t == 0 && !to_h0) continue;  // the last GEMM gives dh0: skipped where it is not asked for
          mine.each([&](int64_t blk, int64_t j0, int64_t j1) {
            const float* A = as_float(D + (t - t0) * dhg.stride(0), dgf, blk, B * ld);
            if (R)
              for (int64_t r = 0; r < B; ++r) at::vec::convert(R + r * H + j0, C + r * H + j0, j1 - j0);
            // dense: all K = G*H rows of w_hh at once; head-wise: per gate, the rows of the unit's head
            const int64_t groups = head == H ? 1 : K / H, rows = head == H ? K : head;
            each_head(j0, j1, head, [&](int64_t u0, int64_t u1, int64_t k0) {
              for (int64_t g = 0; g < groups; ++g) {
                const int64_t r0 = g * H + (head == H ? 0 : k0);
                panel_blocks(B, u1 - u0, rows, ld, H, R != nullptr || g > 0, A + r0,
                             W + blk * pstride * panels + r0 * kPanel, pstride, u0 - j0, C + u0);
              }
            });
            columns_back(C, out, B, H, j0, j1);
          });
          if constexpr (Rows) {
#pragma omp barrier
          }
        }
      }
    }
  }
};

}  // namespace rnnext
