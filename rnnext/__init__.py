"""rnnext: fused LSTM, GRU and Elman RNN kernels (CPU and CUDA) as drop-in torch.nn layers.

- ``rnnext.LSTM/GRU/RNN`` and ``rnnext.LSTMCell/GRUCell/RNNCell``: torch.nn's layers and cells;
  ``rnnext.convert(model)`` swaps them into an existing model, ``rnnext.to_torch(model)`` back.
- ``rnnext.MinimalGRU/MinimalGRUCell``: the lecture notes' GRU (update gate, no reset gate).
- ``rnnext.sLSTM/sLSTMCell``: xLSTM's sLSTM; ``num_heads=`` (head-wise recurrence) on it and LSTM/GRU/RNN.
- ``rnnext.LayerNormLSTM/LayerNormGRU`` (+ cells): layer-normalised cells; ``zoneout=`` on these and the
  LSTM/GRU layers and cells.
- ``rnnext.truncated_bptt``: train on long sequences in chunks of k steps.
- ``rnnext.functional``: the same as functions over torch's flat weight lists; backend switch.
- ``rnnext.reference``: pure-PyTorch implementation (fallback and test oracle).
- ``rnnext.ops``: the fused C++/CUDA ops (``torch.ops.rnnext``).
- ``rnnext.cells``: the table of cells every layer of the code derives from.
- ``rnnext.onnx``: what the layers run under ``torch.onnx.export`` (ONNX LSTM/GRU/RNN, else Scan/Loop).
"""
from rnnext import cells, functional, onnx, ops, reference, utils
from rnnext.functional import set_backend, use_backend
from rnnext.utils import truncated_bptt
from rnnext.modules import (GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell,
                            LSTMCell, MinimalGRU, MinimalGRUCell, RNNCell, convert, sLSTM, sLSTMCell, to_torch)

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MinimalGRU", "MinimalGRUCell", "LayerNormLSTM",
           "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell", "sLSTM", "sLSTMCell", "convert", "to_torch",
           "truncated_bptt", "functional", "reference", "ops", "set_backend", "use_backend"]
__version__ = "0.1.0"
