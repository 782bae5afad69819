// Every op's kernel for one device: each device's file calls register_ops<ItsLauncher>(m).
#pragma once
#include "driver/cell_ops.h"
#include "driver/sequence.h"

namespace rnnext {

template <typename L>
void register_ops(torch::Library& m) {
  m.impl("lstm_cell", &lstm_cell<L>);
  m.impl("lstm_cell_backward", &lstm_cell_backward<L>);
  m.impl("gru_cell", &gru_cell<L>);
  m.impl("gru_cell_backward", &gru_cell_backward<L>);
  m.impl("rnn_cell", &rnn_cell<L>);
  m.impl("rnn_cell_backward", &rnn_cell_backward<L>);
  m.impl("lstm_seq", &lstm_seq<L>);
  m.impl("lstm_seq_backward", &lstm_seq_backward<L>);
  m.impl("gru_seq", &gru_seq<L>);
  m.impl("gru_seq_backward", &gru_seq_backward<L>);
  m.impl("rnn_seq", &rnn_seq<L>);
  m.impl("rnn_seq_backward", &rnn_seq_backward<L>);
  m.impl("mgru_cell", &mgru_cell<L>);
  m.impl("mgru_cell_backward", &mgru_cell_backward<L>);
  m.impl("mgru_seq", &mgru_seq<L>);
  m.impl("mgru_seq_backward", &mgru_seq_backward<L>);
  m.impl("lnlstm_seq", &lnlstm_seq<L>);
  m.impl("lnlstm_seq_backward", &lnlstm_seq_backward<L>);
  m.impl("lngru_seq", &lngru_seq<L>);
  m.impl("lngru_seq_backward", &lngru_seq_backward<L>);
}

}  // namespace rnnext
