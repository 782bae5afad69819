// Every op's kernel for one device: each device's file calls register_ops<ItsLauncher>(m), which registers
// every cell of cells/all.h.
#pragma once
#include "driver/cell_ops.h"
#include "driver/sequence.h"

namespace rnnext {

template <typename L>
void register_ops(torch::Library& m) {
  cells::each([&](auto cell) {
    using Cell = decltype(cell);
    const std::string name = Cell::name;
    m.impl((name + "_seq").c_str(), &seq<L, Cell>);
    m.impl((name + "_seq_backward").c_str(), &seq_backward<L, Cell>);
    if constexpr (!Cell::rows) {
      m.impl((name + "_cell").c_str(), &cell_step<L, Cell>);
      m.impl((name + "_cell_backward").c_str(), &cell_step_backward<L, Cell>);
    }
  });
}

}  // namespace rnnext
