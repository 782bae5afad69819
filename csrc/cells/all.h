// Every cell, one line each: the op schemas (ops.cpp) and every device's kernels (driver/register.h) follow
// from this list. A cell is its header: cells/step.h says what an element cell provides, cells/rows.h what a
// cell that needs whole rows does.
#pragma once
#include <tuple>

#include "cells/gru.h"
#include "cells/layernorm_gru.h"
#include "cells/layernorm_lstm.h"
#include "cells/lstm.h"
#include "cells/minimal_gru.h"
#include "cells/rnn.h"
#include "cells/slstm.h"

namespace rnnext {
namespace cells {

using All = std::tuple<LSTM, GRU, MinimalGRU, RNN<Act::Tanh>, RNN<Act::Relu>, LayerNormLSTM, LayerNormGRU, SLSTM>;

// f(Cell{}) for every cell.
template <typename F>
void each(const F& f) {
  std::apply([&](auto... cell) { (f(cell), ...); }, All{});
}

}  // namespace cells
}  // namespace rnnext
