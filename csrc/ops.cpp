// Every rnnext op schema, in one place. Kernels: cpu/kernels.cpp, cuda/kernels.cu.
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
// what would run: [fits, ctas, units, MT, NT, KT, ktile, smem bytes, elems].
std::vector<int64_t> persistent_plan(bool backward, int64_t G, int64_t B, int64_t H, int64_t elem, int64_t mma,
                                     int64_t parts, int64_t sms, int64_t smem_per_block, int64_t arch) {
  using namespace rnnext::persistent;
  const Plan pl = make_plan(backward ? Dir::Backward : Dir::Forward, G, B, H, elem, Mma(mma), parts,
                            Capacity{sms, smem_per_block, arch});
  return {pl.fits, pl.ctas, pl.units, pl.MT, pl.NT, pl.KT, pl.ktile, pl.smem, pl.elems};
}

// Raises where a persistent kernel failed since the last check (after synchronizing the devices that ran
// one): the kernels report without a host sync per call (persistent/status.h).
void check_persistent() {
  for (auto* check : rnnext::persistent::status_checks()) check();
}

}  // namespace

TORCH_LIBRARY(rnnext, m) {
  m.def("persistent_plan(bool backward, int G, int B, int H, int elem, int mma, int parts, int sms, "
        "int smem_per_block, int arch) -> int[]",
        &persistent_plan);
  m.def("check_persistent() -> ()", &check_persistent);

  // Zoneout's keep masks on CPU (cpu/kernels.cpp; rnnext.reference.keep_mask is its transcription): 1 with
  // probability p, from a counter-based hash of seed (a one-element int64 CPU tensor).
  m.def("keep_mask(Tensor seed, int[] size, float p, ScalarType dtype) -> Tensor");

  // Single-step cells. xg, hg: [B, G*H] input and hidden projections (biases included);
  // cx/hx: [B, H] previous state; saved: [B, 4*H] what backward needs (activated gates).
  m.def("lstm_cell(Tensor xg, Tensor hg, Tensor cx) -> (Tensor hy, Tensor cy, Tensor saved)");
  m.def("lstm_cell_backward(Tensor dhy, Tensor dcy, Tensor cx, Tensor cy, Tensor saved) -> (Tensor dgates, Tensor dcx)");
  m.def("gru_cell(Tensor xg, Tensor hg, Tensor hx) -> (Tensor hy, Tensor saved)");
  m.def("gru_cell_backward(Tensor dhy, Tensor hx, Tensor saved) -> (Tensor dxg, Tensor dhg, Tensor dhx)");
  m.def("rnn_cell(Tensor xg, Tensor hg, str nonlinearity) -> Tensor");
  m.def("rnn_cell_backward(Tensor dhy, Tensor hy, str nonlinearity) -> Tensor");
  m.def("mgru_cell(Tensor xg, Tensor hg, Tensor hx) -> (Tensor hy, Tensor saved)");
  m.def("mgru_cell_backward(Tensor dhy, Tensor hx, Tensor saved) -> (Tensor dgates, Tensor dhx)");

  // One layer-direction over a whole sequence, input projection included; shapes and conventions in
  // driver/sequence.h. y: outputs [T, B, P]; hn, cn: final states; c_all, saved, r: what backward needs.
  // clip: BPTT gradient clipping of the state at every step (0 = off; cells/step.h), taken by the forward
  // ops too so autograd can pass it on. save=False (no backward will follow): c_all and saved come back
  // empty and are not computed. path: 0 auto (the device's default), 1 per-step, 2 persistent where the
  // device has it and the plan fits (else per-step): see driver/loops.h.
  // zoneout_mask, zoneout (LSTM, GRU): zoneout's keep weights, see driver/sequence.h.
  m.def("lstm_seq(Tensor x, Tensor w_ih, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? w_hr, Tensor? lengths, float clip=0., bool save=True, int path=0, Tensor? zoneout_mask=None, "
        "float zoneout=0.) -> (Tensor y, Tensor hn, Tensor cn, Tensor c_all, Tensor saved, Tensor r)");
  m.def("lstm_seq_backward(Tensor dy, Tensor dhn, Tensor dcn, Tensor x, Tensor w_ih, Tensor y, Tensor h0, "
        "Tensor c0, Tensor c_all, Tensor saved, Tensor r, Tensor w_hh, Tensor? w_hr, Tensor? lengths, "
        "float clip=0., int path=0, Tensor? zoneout_mask=None, float zoneout=0.) -> (Tensor dx, Tensor dw_ih, "
        "Tensor dh0, Tensor dc0, Tensor dw_hh, Tensor db_ih, Tensor db_hh, Tensor dw_hr)");
  // The GRU and the lecture's GRU (update gate only; cells/mgru.h: gates (u, c), saved (u, c~)).
  const std::string gated = "(Tensor x, Tensor w_ih, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
                            "Tensor? lengths, float clip=0., bool save=True, int path=0";
  const std::string gated_backward = "_backward(Tensor dy, Tensor dhn, Tensor x, Tensor w_ih, Tensor y, Tensor h0, "
                                     "Tensor saved, Tensor w_hh, Tensor? lengths, float clip=0., int path=0";
  const std::string zoneout = ", Tensor? zoneout_mask=None, float zoneout=0.";
  const std::string outputs = ") -> (Tensor y, Tensor hn, Tensor saved)";
  const std::string grads = ") -> (Tensor dx, Tensor dw_ih, Tensor dh0, Tensor dw_hh, Tensor db_ih, Tensor db_hh)";
  m.def(("gru_seq" + gated + zoneout + outputs).c_str());
  m.def(("gru_seq" + gated_backward + zoneout + grads).c_str());
  m.def(("mgru_seq" + gated + outputs).c_str());
  m.def(("mgru_seq" + gated_backward + grads).c_str());
  m.def("rnn_seq(Tensor x, Tensor w_ih, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, "
        "str nonlinearity, float clip=0., int path=0) -> (Tensor y, Tensor hn)");
  m.def("rnn_seq_backward(Tensor dy, Tensor dhn, Tensor x, Tensor w_ih, Tensor y, Tensor h0, Tensor w_hh, "
        "Tensor? lengths, str nonlinearity, float clip=0., int path=0) -> (Tensor dx, Tensor dw_ih, Tensor dh0, "
        "Tensor dw_hh, Tensor db_ih, Tensor db_hh)");
  // Layer-normalised LSTM and GRU (cells/layernorm.h): ln_w, ln_b the norms' [N*H] weight and bias (LSTM:
  // gates 4H, then cell H; GRU: input projection's 3H, then hidden's 3H); norm, rstd what backward needs.
  m.def("lnlstm_seq(Tensor x, Tensor w_ih, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor ln_w, Tensor ln_b, Tensor? lengths, float eps=1e-5, float clip=0., bool save=True, int path=0, "
        "Tensor? zoneout_mask=None, float zoneout=0.) -> (Tensor y, Tensor hn, Tensor cn, Tensor c_all, "
        "Tensor norm, Tensor rstd)");
  m.def("lnlstm_seq_backward(Tensor dy, Tensor dhn, Tensor dcn, Tensor x, Tensor w_ih, Tensor y, Tensor h0, "
        "Tensor c0, Tensor c_all, Tensor norm, Tensor rstd, Tensor w_hh, Tensor ln_w, Tensor ln_b, Tensor? lengths, "
        "float clip=0., int path=0, Tensor? zoneout_mask=None, float zoneout=0.) -> (Tensor dx, Tensor dw_ih, "
        "Tensor dh0, Tensor dc0, Tensor dw_hh, Tensor db_ih, Tensor db_hh, Tensor dln_w, Tensor dln_b)");
  m.def("lngru_seq(Tensor x, Tensor w_ih, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor ln_w, "
        "Tensor ln_b, Tensor? lengths, float eps=1e-5, float clip=0., bool save=True, int path=0, "
        "Tensor? zoneout_mask=None, float zoneout=0.) -> (Tensor y, Tensor hn, Tensor norm, Tensor rstd)");
  m.def("lngru_seq_backward(Tensor dy, Tensor dhn, Tensor x, Tensor w_ih, Tensor y, Tensor h0, Tensor norm, "
        "Tensor rstd, Tensor w_hh, Tensor ln_w, Tensor ln_b, Tensor? lengths, float clip=0., int path=0, "
        "Tensor? zoneout_mask=None, float zoneout=0.) -> (Tensor dx, Tensor dw_ih, Tensor dh0, Tensor dw_hh, "
        "Tensor db_ih, Tensor db_hh, Tensor dln_w, Tensor dln_b)");
}
