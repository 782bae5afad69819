"""Every cell rnnext computes, one entry each: what the fake kernels (``_fake``), autograd (``ops``), the
reference's dispatch (``reference``) and the layers' argument handling (``functional``) derive from. The C++
list is ``csrc/cells/all.h``, with the same names and traits; a cell's math is its header there
(``csrc/cells/<name>.h``) and its step in :mod:`rnnext.reference`.

Adding a cell: its header and one line in ``csrc/cells/all.h``, its step in ``reference.STEPS``, one entry
here (docs/design.md, "Adding a cell").
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    """A cell's traits (csrc/cells/step.h and rows.h say what each means for the kernels)."""
    name: str            # the ops' prefix: torch.ops.rnnext.<name>_seq, <name>_cell
    gates: int           # G: w_ih and w_hh have G*H rows, in the cell's gate order
    states: int          # Z: carried states per unit, h first (the step GEMM's operand), then the others
    saved: int           # values per unit and step that backward needs
    zoned: int = 0       # how many of the first states zoneout applies to (0: no zoneout)
    separate_hg: bool = False  # the hidden projection has its own gradient (the GRU's b_hn sits inside r*(.))
    proj: bool = False   # takes proj_size (a projection of h: the LSTM)
    rows: bool = False   # needs whole rows (layer norm): no single-step op, no persistent kernel
    stats: int = 0       # values per row and step that backward needs, in float (layer norm: 1/std)
    params: tuple = ()   # names of the cell's own parameters, [param_units * H] each
    param_units: int = 0

    @property
    def others(self):
        """The states but h: s0's first dimension."""
        return self.states - 1


CELLS = {c.name: c for c in (
    Cell("lstm", gates=4, states=2, saved=4, zoned=2, proj=True),
    Cell("gru", gates=3, states=1, saved=4, zoned=1, separate_hg=True),
    Cell("minimal_gru", gates=2, states=1, saved=2),
    Cell("rnn_tanh", gates=1, states=1, saved=0),
    Cell("rnn_relu", gates=1, states=1, saved=0),
    Cell("layernorm_lstm", gates=4, states=2, saved=5, zoned=2, rows=True, stats=2, params=("ln_w", "ln_b"),
         param_units=5),
    Cell("layernorm_gru", gates=3, states=1, saved=6, zoned=1, separate_hg=True, rows=True, stats=2,
         params=("ln_w", "ln_b"), param_units=6),
    Cell("slstm", gates=4, states=4, saved=6),
)}

# torch.nn's mode strings (nn.RNNBase.mode), MinimalGRU's, and short names for the layer-normalised cells
MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "MINIMAL_GRU": "minimal_gru",
         "LNLSTM": "layernorm_lstm", "LNGRU": "layernorm_gru", "SLSTM": "slstm"}


def get(cell):
    """The Cell of a name (or of a torch.nn mode string); an unknown name fails by name."""
    if isinstance(cell, Cell):
        return cell
    found = CELLS.get(MODES.get(cell, cell))
    if found is None:
        raise ValueError(f"rnnext: unknown cell {cell!r}; the cells are {', '.join(CELLS)}")
    return found
