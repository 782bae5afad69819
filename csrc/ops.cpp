// Every rnnext op schema, in one place. Kernels: cpu/kernels.cpp, cuda/kernels.cu.
// Python side (fake kernels, autograd): rnnext/ops.py.
#include <Python.h>
#include <torch/library.h>

// `import rnnext._C` loads this library, which registers the ops below with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rnnext, m) {
  // Single-step cells. xg, hg: [B, G*H] input and hidden projections (biases included);
  // cx/hx: [B, H] previous state; saved: [B, 4*H] what backward needs (activated gates).
  m.def("lstm_cell(Tensor xg, Tensor hg, Tensor cx) -> (Tensor hy, Tensor cy, Tensor saved)");
  m.def("lstm_cell_backward(Tensor dhy, Tensor dcy, Tensor cx, Tensor cy, Tensor saved) -> (Tensor dgates, Tensor dcx)");
  m.def("gru_cell(Tensor xg, Tensor hg, Tensor hx) -> (Tensor hy, Tensor saved)");
  m.def("gru_cell_backward(Tensor dhy, Tensor hx, Tensor saved) -> (Tensor dxg, Tensor dhg, Tensor dhx)");
  m.def("rnn_cell(Tensor xg, Tensor hg, str nonlinearity) -> Tensor");
  m.def("rnn_cell_backward(Tensor dhy, Tensor hy, str nonlinearity) -> Tensor");
}
