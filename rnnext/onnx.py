"""ONNX export: the backend :mod:`rnnext.functional` picks while ``torch.onnx.export`` runs.

``torch.onnx.is_in_onnx_export()`` is True under both of torch's exporters (the torch.export-based one,
``dynamo=True``, the default since torch 2.9, and the TorchScript-based one, ``dynamo=False``), and then the
layers and cells run this module instead of the fused ops, whose custom ops neither exporter knows. Same
functions as :mod:`rnnext.reference`: ``step`` (one cell step: plain PyTorch, it exports as it is) and
:func:`recurrence`, one layer-direction over a sequence, which writes:

- LSTM (no proj_size), GRU, RNN (tanh or relu), no zoneout: one ONNX ``LSTM`` / ``GRU`` / ``RNN`` node per
  layer-direction (direction "forward" or "reverse"), weights regrouped to ONNX's gate order (LSTM iofc from
  torch's ifgo, GRU zrh from rzn, ``linear_before_reset=1``: torch's b_hn inside r*(.)), biases as
  ``[Wb, Rb]``, ``sequence_lens`` from the lengths of packed input, h0/c0 as ``initial_h``/``initial_c``.
- Everything else (LSTM with proj_size, MinimalGRU, LayerNormLSTM/GRU, zoneout's eval mixture): the input
  projection as one MatMul over all steps, then one step of standard ops (MatMul, Sigmoid, Tanh,
  LayerNormalization, Where for lengths) in an ONNX ``Scan`` (dynamo=True) or ``Loop`` (dynamo=False):
  T stays a dynamic dimension, no step is unrolled.

Why this way (torch 2.14, onnxscript 0.7):

- Not ``torch._VF.lstm/gru/rnn_*``, which both exporters translate: ``aten::lstm`` takes no lengths (the
  recurrence does: packed input), the dynamo exporter's translation of it ignores proj_size's ``w_hr`` (torch.nn's
  LSTM with proj_size exports to a model onnxruntime rejects) and the TorchScript exporter refuses projections.
- dynamo=True: ``torch.onnx.ops.symbolic_multi_out`` writes exactly the node asked for (attributes, optional
  inputs), an FX op that torch.export keeps. The loop: torch's ``scan`` higher-order op, which that exporter
  writes as ``Scan``, called as ``torch.ops.higher_order.scan`` with the step's tensors as explicit inputs
  (``torch._higher_order_ops.scan`` compiles every call with Dynamo first, twice the export's time) and with
  inputs detached (else the exporter's decompositions trace the scan's backward: most of the export's time).
- dynamo=False: that exporter cannot record ``symbolic_multi_out`` (its inputs are a ``Tensor?[]`` list), so the
  node comes from an ``autograd.Function`` with a ``symbolic`` method (that exporter's own mechanism; its forward
  runs the reference, so the trace carries real values); the loop is a TorchScript-scripted function called from
  the trace, whose ``prim::Loop`` that exporter writes as ``Loop``.
- The step functions below are TorchScript-compatible Python, shared by ``scan`` and the scripted loops.
- :func:`exporting` (the functional layer's switch) also reads the dynamo exporter's flag itself: where the
  exporter falls back to torch.export(strict=True), Dynamo folds ``is_in_onnx_export()`` to False.

What does not export, as torch.nn: training-mode dropout between layers with dynamo=False (torch.nn raises
there; with dynamo=True both write ONNX ``Dropout`` nodes, ``training_mode`` true, as torch.nn does);
packed input with dynamo=True (torch.export cannot trace torch's pad_packed_sequence: use dynamo=False, as
for torch.nn). Not at all: training-mode zoneout (random masks from rnnext's generator op). state_grad_clip
changes gradients only, so the exported forward ignores it.
"""
import functools
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnext import cells, reference
from rnnext.lengths import flip_within, step_mask

step = reference.step  # one step of a cell: standard ops

try:
    from torch.onnx._internal.exporter import _flags as _exporter_flags
except ImportError:  # another torch: is_in_onnx_export() alone
    _exporter_flags = None


def exporting() -> bool:
    """Whether torch.onnx.export is running: ``torch.onnx.is_in_onnx_export()``, or the dynamo exporter's own flag,
    read directly where Dynamo traces (that exporter retries with torch.export(strict=True) when the non-strict
    capture fails, and Dynamo folds is_in_onnx_export() to False: the retry would record the fused ops)."""
    return torch.onnx.is_in_onnx_export() or bool(getattr(_exporter_flags, "_is_onnx_exporting", False))


# The cells that are an ONNX operator, and its gate order as indices into torch's: LSTM (i, o, f, c) from
# (i, f, g, o); GRU (z, r, h) from (r, z, n).
OPERATORS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}


def keep_mask(p, size, like):
    """Zoneout's training masks: cannot export (random draws of rnnext's own generator op)."""
    raise RuntimeError("rnnext: zoneout in training mode cannot be exported to ONNX (its masks are random draws); "
                       "call model.eval() before exporting: zoneout then exports as its deterministic mixture "
                       "p*previous + (1-p)*new")


def check_packed():
    """PackedSequence input: exports with dynamo=False only (lengths as sequence_lens), as torch.nn's layers."""
    if not torch.jit.is_tracing():
        raise RuntimeError(
            "rnnext: PackedSequence input does not export with torch.onnx.export(dynamo=True): torch.export cannot "
            "trace the packing code's data-dependent batch sizes (torch.nn's layers fail there too); export with "
            "dynamo=False, which writes the lengths as the ONNX operators' sequence_lens")


def dropout(x, p, train):
    """Dropout between layers, as torch.nn's RNNs export it: an ONNX Dropout with dynamo=True; an error
    with the TorchScript-based exporter, whose translation of torch.nn's RNNs raises for it."""
    if train and p > 0 and torch.jit.is_tracing():
        raise torch.onnx.OnnxExporterError(
            "rnnext: dropout between layers in training mode does not export with dynamo=False (as for torch.nn's "
            "RNN/GRU/LSTM): export in eval mode (training=torch.onnx.TrainingMode.EVAL, the default) or with "
            "dynamo=True, which writes ONNX Dropout nodes as it does for torch.nn")
    return F.dropout(x, p, train)


# ---- the steps of the Scan/Loop path (TorchScript-compatible: the dynamo=False path scripts them) --------

def _lstm_step(x: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
               ln_w: Optional[Tensor], ln_b: Optional[Tensor], hidden: int, eps: float,
               keep: float) -> Tuple[Tensor, Tensor]:
    """LSTM or LayerNormLSTM (ln_w, ln_b given) step; x = W_ih x_t + b_ih. Returns (h', c')."""
    a = x + F.linear(h, w_hh, b_hh)
    if ln_w is not None and ln_b is not None:
        a = F.layer_norm(a, [4 * hidden], ln_w[:4 * hidden], ln_b[:4 * hidden], eps)
    i, f, g, o = a.chunk(4, 1)
    cy = f.sigmoid() * c + i.sigmoid() * g.tanh()
    if ln_w is not None and ln_b is not None:
        cy = F.layer_norm(cy, [hidden], ln_w[4 * hidden:], ln_b[4 * hidden:], eps)
    hy = o.sigmoid() * cy.tanh()
    if w_hr is not None:
        hy = F.linear(hy, w_hr)
    if keep > 0:
        hy = keep * h + (1 - keep) * hy
        cy = keep * c + (1 - keep) * cy
    return hy, cy


def _gru_step(x: Tensor, h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], ln_w: Optional[Tensor],
              ln_b: Optional[Tensor], hidden: int, eps: float, keep: float, minimal: bool) -> Tensor:
    """GRU, LayerNormGRU (ln_w, ln_b given) or the lecture's GRU (minimal) step; x = W_ih x_t + b_ih."""
    hg = F.linear(h, w_hh, b_hh)
    if minimal:
        u, cand = (x + hg).chunk(2, 1)
        u = u.sigmoid()
        hy = u * cand.tanh() + (1 - u) * h
    else:
        if ln_w is not None and ln_b is not None:
            x = F.layer_norm(x, [3 * hidden], ln_w[:3 * hidden], ln_b[:3 * hidden], eps)
            hg = F.layer_norm(hg, [3 * hidden], ln_w[3 * hidden:], ln_b[3 * hidden:], eps)
        xr, xz, xn = x.chunk(3, 1)
        hr, hz, hn = hg.chunk(3, 1)
        r = (xr + hr).sigmoid()
        z = (xz + hz).sigmoid()
        hy = (1 - z) * (xn + r * hn).tanh() + z * h
    if keep > 0:
        hy = keep * h + (1 - keep) * hy
    return hy


def _slstm_step(x: Tensor, h: Tensor, c: Tensor, n: Tensor, m: Tensor, w_hh: Tensor,
                b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """sLSTM step (csrc/cells/slstm.h); x = W_ih x_t + b_ih. Returns (h', c', n', m')."""
    pi, pf, pz, po = (x + F.linear(h, w_hh, b_hh)).chunk(4, 1)
    a = torch.clamp(pf, max=0.0) - torch.log(1 + torch.exp(-pf.abs())) + m  # logsigmoid(f~) + m', stable
    empty = n == 0
    m_new = torch.where(empty | (pi >= a), pi, a)
    f = torch.where(empty, 0.0, torch.exp(a - m_new))
    i = torch.exp(pi - m_new)
    c_new = f * c + i * pz.tanh()
    n_new = f * n + i
    return po.sigmoid() * c_new / n_new, c_new, n_new, m_new


# valid: the [T, B, 1] mask of steps within their lengths where masked, else unused (an Optional argument
# would be carried through the exported Loop as an untyped optional, which onnx's checker rejects).
def _lstm_loop(xg: Tensor, masked: bool, valid: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
               w_hr: Optional[Tensor], ln_w: Optional[Tensor], ln_b: Optional[Tensor], hidden: int, eps: float,
               keep: float) -> Tuple[Tensor, Tensor, Tensor]:
    ys: List[Tensor] = []
    for t in range(xg.size(0)):
        hy, cy = _lstm_step(xg[t], h, c, w_hh, b_hh, w_hr, ln_w, ln_b, hidden, eps, keep)
        if masked:
            ys.append(torch.where(valid[t], hy, 0.0))
            hy, cy = torch.where(valid[t], hy, h), torch.where(valid[t], cy, c)
        else:
            ys.append(hy)
        h, c = hy, cy
    return torch.stack(ys), h, c


def _slstm_loop(xg: Tensor, masked: bool, valid: Tensor, h: Tensor, c: Tensor, n: Tensor, m: Tensor, w_hh: Tensor,
                b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ys: List[Tensor] = []
    for t in range(xg.size(0)):
        hy, cy, ny, my = _slstm_step(xg[t], h, c, n, m, w_hh, b_hh)
        if masked:
            ys.append(torch.where(valid[t], hy, 0.0))
            hy, cy = torch.where(valid[t], hy, h), torch.where(valid[t], cy, c)
            ny, my = torch.where(valid[t], ny, n), torch.where(valid[t], my, m)
        else:
            ys.append(hy)
        h, c, n, m = hy, cy, ny, my
    return torch.stack(ys), h, c, n, m


def _gru_loop(xg: Tensor, masked: bool, valid: Tensor, h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
              ln_w: Optional[Tensor], ln_b: Optional[Tensor], hidden: int, eps: float, keep: float,
              minimal: bool) -> Tuple[Tensor, Tensor]:
    ys: List[Tensor] = []
    for t in range(xg.size(0)):
        hy = _gru_step(xg[t], h, w_hh, b_hh, ln_w, ln_b, hidden, eps, keep, minimal)
        if masked:
            ys.append(torch.where(valid[t], hy, 0.0))
            hy = torch.where(valid[t], hy, h)
        else:
            ys.append(hy)
        h = hy
    return torch.stack(ys), h


@functools.cache
def _scripted(fn):
    with warnings.catch_warnings():  # torch.jit.script is deprecated in favour of torch.export
        warnings.simplefilter("ignore")
        return torch.jit.script(fn)


def _scan(step, xg, valid, states, args):
    """The step loop as torch's scan operator (dynamo=True), called directly with the step's tensors as explicit
    inputs. step(x, *states, *args) -> the new states (a tuple, or a tensor for one state)."""
    slots = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor)]
    masked = valid is not None
    n_state = len(states)

    def body(*flat):
        state, x = flat[:n_state], flat[n_state]
        ok = flat[n_state + 1] if masked else None
        given = list(args)
        for k, t in zip(slots, flat[n_state + 1 + masked:]):
            given[k] = t
        new = step(x, *state, *given)
        new = new if isinstance(new, tuple) else (new,)
        hy = new[0]
        if ok is None:
            return [*new, hy.clone()]  # scan refuses an output aliasing the carry
        return [*(torch.where(ok, n, o) for n, o in zip(new, state)), torch.where(ok, hy, 0.0)]

    # clone: scan refuses aliased inputs, and a caller may pass one tensor as both h0 and c0. detach: the exporter's
    # decompositions would trace the backward of a scan whose inputs require grad (most of the export's time).
    init = [s.detach().clone() for s in states]
    xs = [xg.detach(), valid] if masked else [xg.detach()]
    out = torch.ops.higher_order.scan(body, init, xs, tuple(args[k].detach() for k in slots))
    return out[n_state], tuple(out[:n_state])


def _looped(cell, xg, valid, states, w_hh, b_hh, w_hr, ln_w, ln_b, eps, zoneout):
    """(y, final states) of the Scan (dynamo=True) or scripted Loop (dynamo=False) over cell's step."""
    hidden = int(w_hh.size(0)) // cell.gates  # a traced size is a tensor
    keep = float(zoneout)
    if cell.name in ("lstm", "layernorm_lstm"):
        step, loop, args = _lstm_step, _lstm_loop, (w_hh, b_hh, w_hr, ln_w, ln_b, hidden, float(eps), keep)
    elif cell.name == "slstm":
        step, loop, args = _slstm_step, _slstm_loop, (w_hh, b_hh)
    else:
        step, loop = _gru_step, _gru_loop
        args = (w_hh, b_hh, ln_w, ln_b, hidden, float(eps), keep, cell.name == "minimal_gru")
    if not torch.jit.is_tracing():
        return _scan(step, xg, valid, states, args)
    masked = (valid is not None, xg if valid is None else valid)
    y, *final = _scripted(loop)(xg, *masked, *states, *args)
    return y, tuple(final)


# ---- ONNX LSTM / GRU / RNN nodes ------------------------------------------------------------------------

def _regrouped(w, order):
    """Gate blocks of w (rows) in ONNX's order: slices of consecutive blocks, concatenated (few ops: each one costs
    the dynamo exporter time)."""
    H = int(w.size(0)) // len(order)
    runs = []
    for k in order:
        if runs and runs[-1][1] == k:
            runs[-1][1] = k + 1
        else:
            runs.append([k, k + 1])
    return w if len(runs) == 1 else torch.cat([w[a * H:b * H] for a, b in runs])


class _Node(torch.autograd.Function):
    """The node for the TorchScript-based exporter: symbolic() writes it, forward() gives the trace the
    reference's values (from the torch-layout tensors after the node's inputs, which the graph then drops)."""

    @staticmethod
    def forward(ctx, op, attrs, X, W, R, B, seq, h0, c0, cell, x, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
        states = (h0[0],) if c0 is None else (h0[0], c0[0])
        y, final = reference.recurrence(cell, x, w_ih, w_hh, states, b_ih, b_hh, lengths=lengths, reverse=reverse)
        return (y.unsqueeze(1), *(s.unsqueeze(0) for s in final))

    @staticmethod
    def symbolic(g, op, attrs, X, W, R, B, seq, h0, c0, *_):
        from torch.onnx._internal.torchscript_exporter import symbolic_helper

        def opt(v):
            return symbolic_helper._optional_input_placeholder_tensor(g) if v is None else v

        inputs = [X, W, R, opt(B), opt(seq), h0] + ([] if c0 is None else [c0])
        suffix = {int: "i", str: "s", list: "s"}
        return g.op(op, *inputs, outputs=3 if op == "LSTM" else 2,
                    **{f"{k}_{suffix[type(v)]}": v for k, v in attrs})


def _node(cell, x, w_ih, h0, c0, w_hh, b_ih, b_hh, lengths, reverse):
    op = OPERATORS[cell]
    order = GATE_ORDER[op]
    W = _regrouped(w_ih, order).unsqueeze(0)
    R = _regrouped(w_hh, order).unsqueeze(0)
    B = None
    if b_ih is not None or b_hh is not None:
        b_ih = torch.zeros_like(b_hh) if b_ih is None else b_ih
        b_hh = torch.zeros_like(b_ih) if b_hh is None else b_hh
        B = torch.cat([_regrouped(b_ih, order), _regrouped(b_hh, order)]).unsqueeze(0)
    seq = None if lengths is None else lengths.to(torch.int32)
    H = int(w_hh.size(1))  # an attribute (a traced size is a tensor)
    attrs = [("hidden_size", H), ("direction", "reverse" if reverse else "forward")]
    if op == "GRU":
        attrs.append(("linear_before_reset", 1))
    if op == "RNN":
        attrs.append(("activations", ["Relu" if cell == "rnn_relu" else "Tanh"]))
    initial = [h0.unsqueeze(0)] + ([] if c0 is None else [c0.unsqueeze(0)])
    if torch.jit.is_tracing():
        outs = _Node.apply(op, tuple(attrs), x, W, R, B, seq, *initial, *([None] if c0 is None else []), cell,
                           x, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    else:
        T, batch = x.size(0), x.size(1)
        n = 3 if op == "LSTM" else 2
        outs = torch.onnx.ops.symbolic_multi_out(
            op, [x, W, R, B, seq, *initial], dict(attrs), dtypes=[x.dtype] * n,
            shapes=[[T, 1, batch, H]] + [[1, batch, H]] * (n - 1))
    y, h = outs[0].squeeze(1), outs[1].squeeze(0)
    return y, h, outs[2].squeeze(0) if op == "LSTM" else None


def recurrence(cell, x, w_ih, w_hh, states, b_ih=None, b_hh=None, params=(), w_hr=None, lengths=None, reverse=False,
               clip=0.0, zoneout_mask=None, zoneout=0.0, eps=1e-5, path=0):
    """One layer-direction over a sequence, as ONNX operators: arguments, shapes and results as
    :func:`rnnext.reference.recurrence`. An ONNX LSTM/GRU/RNN node where the math is that operator's (the
    cells lstm without w_hr, gru, rnn_tanh, rnn_relu; no zoneout; a head-wise w_hh given dense), else a Scan
    (dynamo=True) or Loop (dynamo=False) over one step of standard ops. clip and path change nothing in the
    forward; zoneout_mask (training) raises."""
    cell = cells.get(cell)
    if zoneout_mask is not None:
        keep_mask(0.0, (), x)
    if lengths is not None:
        lengths = lengths.long()  # the TorchScript exporter hands packed input's lengths over as int32
    if cell.name in OPERATORS and w_hr is None and not zoneout:
        y, h, c = _node(cell.name, x, w_ih, states[0], states[1] if cell.others else None, w_hh, b_ih, b_hh, lengths,
                        reverse)
        return y, (h,) if c is None else (h, c)
    xg = F.linear(x, w_ih, b_ih)
    if reverse:
        xg = flip_within(xg, lengths)
    valid = None if lengths is None else step_mask(lengths, xg.size(0))
    ln_w, ln_b = params if params else (None, None)
    y, final = _looped(cell, xg, valid, tuple(states), w_hh, b_hh, w_hr, ln_w, ln_b, eps, zoneout)
    if reverse:
        y = flip_within(y, lengths)
    return y, final
