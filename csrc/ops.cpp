// Every rnnext op schema, in one place. Kernels: cpu/register.cpp, cpu/keep_mask.cpp, cuda/kernels.cu.
// Python side (fake kernels, autograd): rnnext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "persistent/plan.h"
#include "persistent/status.h"

// `import rnnext._C` loads this library, which registers the ops below with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace {

// The planner of the persistent kernels (persistent/plan.h), for tests and for users who want to know
// what would run: [fits, ctas, units, MT, NT, KT, ktile, smem bytes, elems, local, wn]; head: the units per head of
// a head-wise W_hh (0: dense).
std::vector<int64_t> persistent_plan(bool backward, int64_t G, int64_t B, int64_t H, int64_t elem, int64_t mma,
                                     int64_t parts, int64_t sms, int64_t smem_per_block, int64_t arch, int64_t head) {
  using namespace rnnext::persistent;
  const Plan pl = make_plan(backward ? Dir::Backward : Dir::Forward, G, B, H, elem, Mma(mma), parts,
                            Capacity{sms, smem_per_block, arch}, head);
  return {pl.fits, pl.ctas, pl.units, pl.MT, pl.NT, pl.KT, pl.ktile, pl.smem, pl.elems, pl.local, pl.wn};
}

// Raises where a persistent kernel failed since the last check (after synchronizing the devices that ran
// one): the kernels report without a host sync per call (persistent/status.h).
void check_persistent() {
  for (auto* check : rnnext::persistent::status_checks()) check();
}

}  // namespace

TORCH_LIBRARY(rnnext, m) {
  m.def(
      "persistent_plan(bool backward, int G, int B, int H, int elem, int mma, int parts, int sms, "
      "int smem_per_block, int arch, int head=0) -> int[]",
      &persistent_plan);
  m.def("check_persistent() -> ()", &check_persistent);

  // Zoneout's keep masks on CPU (cpu/keep_mask.cpp; rnnext.reference.keep_mask is its transcription): 1 with
  // probability p, from a counter-based hash of seed (a one-element int64 CPU tensor).
  m.def("keep_mask(Tensor seed, int[] size, float p, ScalarType dtype) -> Tensor");

  // The CPU's GEMMs (cpu/register.cpp), for tests: the path CpuLauncher::gemm takes for dtype ("packed": AMX with
  // a packed B, cpu/packed.h; "brgemm"; "aten") and whether cpublas packs dtype; the switch that forces the
  // fallback (RNNEXT_CPU_PACKED=0 at load), returning its previous state; and out = add + a @ b through that gemm
  // (how: "gemm"; "weight": b through right_operand first, as the weights go; "emulated": the packed path on
  // plain C++ kernels, on any CPU).
  m.def("cpu_gemm_path(ScalarType dtype) -> (str, bool)");
  m.def("set_cpu_packed(bool allowed) -> bool");
  m.def("cpu_gemm(Tensor a, Tensor b, Tensor? add, str how) -> Tensor");

  // Per cell of cells/all.h. One layer-direction over a whole sequence, input projection included; shapes,
  // conventions and output_mask's order in driver/sequence.h. The cell's own parameters are param0, param1
  // (layer norm's weight and bias) rather than a Tensor[]: AOTInductor's proxy executor passes an empty list
  // as None.
  const std::string seq =
      "_seq(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor h0, Tensor s0, "
      "Tensor? param0, Tensor? param1, Tensor? w_hr=None, Tensor? lengths=None, "
      "Tensor? zoneout_mask=None, "
      "float zoneout=0., float clip=0., float eps=1e-5, bool save=True, int path=0) -> (Tensor y, "
      "Tensor h_n, Tensor s_n, Tensor s_all, Tensor saved, Tensor stats, Tensor r)";
  const std::string seq_backward =
      "_seq_backward(Tensor dy, Tensor dh_n, Tensor ds_n, Tensor x, Tensor w_ih, Tensor w_hh, Tensor h0, Tensor s0, "
      "Tensor? param0, Tensor? param1, Tensor? w_hr, Tensor? lengths, Tensor? zoneout_mask, float zoneout, "
      "float clip, Tensor y, Tensor s_all, Tensor saved, Tensor stats, Tensor r, int path, bool[10] output_mask) -> "
      "(Tensor dx, Tensor dw_ih, Tensor dw_hh, Tensor db_ih, Tensor db_hh, Tensor dh0, Tensor ds0, Tensor dparam0, "
      "Tensor dparam1, Tensor dw_hr)";
  // One step of an element cell on precomputed projections (driver/cell_ops.h): xg, hg [B, G*H] biases included,
  // h [B, H], s [Z-1, B, H] the states before; saved [B, SAVED*H]; dgates [B, G*H] (2*G*H: xg's, then hg's,
  // for cells whose hg has its own gradient).
  const std::string cell =
      "_cell(Tensor xg, Tensor hg, Tensor h, Tensor s) -> (Tensor h_new, Tensor s_new, Tensor saved)";
  const std::string cell_backward =
      "_cell_backward(Tensor dh_new, Tensor ds_new, Tensor h, Tensor s, Tensor h_new, "
      "Tensor saved) -> (Tensor dgates, Tensor dh, Tensor ds)";
  rnnext::cells::each([&](auto c) {
    using Cell = decltype(c);
    const std::string name = Cell::name;
    m.def((name + seq).c_str());
    m.def((name + seq_backward).c_str());
    if constexpr (!Cell::rows) {
      m.def((name + cell).c_str());
      m.def((name + cell_backward).c_str());
    }
  });
}
