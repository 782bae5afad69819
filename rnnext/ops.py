"""The fused C++/CUDA ops (``torch.ops.rnnext.*``): fake kernels, autograd, and Python wrappers.

The wrappers have the same signatures as the cells in :mod:`rnnext.reference`, so the two are
interchangeable wherever a "cells" namespace is expected (``functional`` picks one per call).

Single-step cells; ``xg``/``hg`` are the input and hidden projections ``[B, G*H]`` (biases included):

- ``lstm_cell(xg, hg, cx) -> (hy, cy, saved)``
- ``gru_cell(xg, hg, hx) -> (hy, saved)``
- ``rnn_cell(xg, hg, nonlinearity) -> hy``
- ``mgru_cell(xg, hg, hx) -> (hy, saved)``: the lecture's GRU (update gate only), saved ``[B, 2*H]`` = (u, c~)

``saved`` is what backward needs, ``[B, 4*H]``: activated gates (i, f, g, o) for LSTM; (r, z, n, hn)
for GRU, where hn is the hidden part of n's pre-activation. It is not differentiable.

One layer-direction over a whole sequence (shapes in ``csrc/driver/sequence.h``):

- ``recurrence(mode, xg, h0, c0, w_hh, b_ih, b_hh, w_hr, lengths, reverse, nonlinearity, clip)
  -> (y, h_n, c_n)``, the signature of :func:`rnnext.reference.recurrence`, over
  ``torch.ops.rnnext.{lstm,gru,mgru,rnn}_seq``. Saved for backward: the output ``y [T, B, P]`` and h0
  (the states before each step are y[t-1]), LSTM cell states ``[T, B, H]`` and c0, activated gates
  ``[T, B, 4*H]`` (LSTM, GRU; ``2*H`` for the lecture's GRU) and, with proj_size, the cell outputs before
  projection ``[T, B, H]``.
"""
import warnings

import torch

from rnnext import _fake
from rnnext.lengths import check_lengths, flip_within

try:
    from rnnext import _C  # noqa: F401  (loading it registers the ops)

    LOAD_ERROR = None
except ImportError as e:  # source checkout without a build
    LOAD_ERROR = e
    warnings.warn(
        f"rnnext: the C++ extension is not built ({e}); every op runs the pure-PyTorch reference. "
        "Build it with: pip install --no-build-isolation -e .",
        stacklevel=2,
    )

DTYPES = _fake.DTYPES
# Device types with fused kernels, decided once here: a per-call dispatcher query would be a graph
# break under torch.compile.
DEVICES = frozenset() if LOAD_ERROR is not None else frozenset(
    ["cpu"] + (["cuda"] if torch._C._dispatch_has_kernel_for_dispatch_key("rnnext::lstm_cell", "CUDA") else []))


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernels run on ``t``'s device and dtype."""
    return t.device.type in DEVICES and t.dtype in DTYPES


def lstm_cell(xg, hg, cx):
    return torch.ops.rnnext.lstm_cell(xg, hg, cx)


def gru_cell(xg, hg, hx):
    return torch.ops.rnnext.gru_cell(xg, hg, hx)


def rnn_cell(xg, hg, nonlinearity):
    return torch.ops.rnnext.rnn_cell(xg, hg, nonlinearity)


def mgru_cell(xg, hg, hx):
    return torch.ops.rnnext.mgru_cell(xg, hg, hx)


def recurrence(mode, x, w_ih, h0, c0, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False,
               nonlinearity="tanh", clip=0.0, path=0, zoneout_mask=None, zoneout=0.0, ln_w=None, ln_b=None,
               eps=1e-5):
    """One layer-direction on the fused sequence ops, input projection included; see
    :func:`rnnext.reference.recurrence`. path: 0 the device's default, 1 per step (a GEMM and a cell kernel
    per step), 2 the persistent kernel where it runs and fits (one launch, weights on chip; on CPU an
    emulation for tests), else per step."""
    check_lengths(lengths, x.size(0))
    if reverse:
        x = flip_within(x, lengths)
    # Without a backward to follow (no_grad, or nothing requires grad), skip saving the gates.
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_ih, h0, c0, w_hh, b_ih, b_hh, w_hr, ln_w, ln_b))
    cn = None
    if mode == "LNLSTM":
        y, hn, cn = torch.ops.rnnext.lnlstm_seq(x, w_ih, h0, c0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps, clip, save,
                                                path, zoneout_mask, zoneout)[:3]
    elif mode == "LNGRU":
        y, hn = torch.ops.rnnext.lngru_seq(x, w_ih, h0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps, clip, save, path,
                                           zoneout_mask, zoneout)[:2]
    elif mode == "LSTM":
        y, hn, cn = torch.ops.rnnext.lstm_seq(x, w_ih, h0, c0, w_hh, b_ih, b_hh, w_hr, lengths, clip, save, path,
                                              zoneout_mask, zoneout)[:3]
    elif mode == "GRU":
        y, hn, _ = torch.ops.rnnext.gru_seq(x, w_ih, h0, w_hh, b_ih, b_hh, lengths, clip, save, path, zoneout_mask,
                                            zoneout)
    elif mode == "MGRU":
        y, hn, _ = torch.ops.rnnext.mgru_seq(x, w_ih, h0, w_hh, b_ih, b_hh, lengths, clip, save, path)
    else:
        y, hn = torch.ops.rnnext.rnn_seq(x, w_ih, h0, w_hh, b_ih, b_hh, lengths, nonlinearity, clip, path)
    if reverse:
        y = flip_within(y, lengths)
    return y, hn, cn


def check_persistent():
    """Raises where a persistent CUDA kernel timed out in its grid barrier since the last check (its outputs
    were NaN), after synchronizing the devices that ran one. The kernels report without a host sync per call:
    the next persistent launch on that device raises too."""
    torch.ops.rnnext.check_persistent()


def _first_order_only(name):
    """The backward ops have no derivatives of their own: refuse create_graph=True rather than return
    a graph that silently lacks the second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"rnnext: double backward (create_graph=True) through the fused {name} op is not supported yet; "
            "run the model under rnnext.use_backend('reference') to get higher-order gradients")


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _biases(ctx, b_ih, b_hh):
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None


def _bias_grads(ctx, db_ih, db_hh):
    return db_ih if ctx.has_b_ih else None, db_hh if ctx.has_b_hh else None


def _options(ctx, rest):
    """(clip, save, path, zoneout_mask, zoneout) after the tensors; tracing may drop defaulted trailing ones."""
    ctx.clip = rest[0] if len(rest) > 0 else 0.0
    ctx.saved_gates = rest[1] if len(rest) > 1 else True
    ctx.path = rest[2] if len(rest) > 2 else 0
    ctx.zoneout = rest[4] if len(rest) > 4 else 0.0
    return rest[3] if len(rest) > 3 else None  # the zoneout mask: for save_for_backward


def _check_saved(ctx, name):
    if not ctx.saved_gates:
        raise RuntimeError(f"rnnext: {name} ran without saving for backward (save=False); "
                           "call it with save=True when a gradient is needed")


def _autograd_lstm_seq(lib):
    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # else autograd zero-fills [T, B, 4H] grads for saved outputs
        x, w_ih, h0, c0, w_hh, b_ih, b_hh, w_hr, lengths, *rest = inputs
        mask = _options(ctx, rest)
        y, hn, cn, c_all, saved, r = output
        ctx.mark_non_differentiable(c_all, saved, r)
        _biases(ctx, b_ih, b_hh)
        ctx.has_proj = w_hr is not None
        ctx.save_for_backward(x, w_ih, y, h0, c0, c_all, saved, r, w_hh, w_hr, lengths, mask)

    def backward(ctx, dy, dhn, dcn, *_):
        _first_order_only("lstm_seq")
        _check_saved(ctx, "lstm_seq")
        x, w_ih, y, h0, c0, c_all, saved, r, w_hh, w_hr, lengths, mask = ctx.saved_tensors
        dx, dw_ih, dh0, dc0, dw_hh, db_ih, db_hh, dw_hr = torch.ops.rnnext.lstm_seq_backward(
            _zeros_if_none(dy, y), _zeros_if_none(dhn, h0), _zeros_if_none(dcn, c0), x, w_ih, y, h0, c0, c_all, saved,
            r, w_hh, w_hr, lengths, ctx.clip, ctx.path, mask, ctx.zoneout)
        return (dx, dw_ih, dh0, dc0, dw_hh, *_bias_grads(ctx, db_ih, db_hh), dw_hr if ctx.has_proj else None,
                *[None] * 6)

    torch.library.register_autograd(lib + "lstm_seq", backward, setup_context=setup)


def _autograd_gated_seq(lib, name):
    """The GRU and the lecture's GRU: same signatures but the GRU's zoneout."""
    zoned = name == "gru_seq"

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # else autograd zero-fills [T, B, 4H] grads for saved outputs
        x, w_ih, h0, w_hh, b_ih, b_hh, lengths, *rest = inputs
        mask = _options(ctx, rest)
        y, hn, saved = output
        ctx.mark_non_differentiable(saved)
        _biases(ctx, b_ih, b_hh)
        ctx.save_for_backward(x, w_ih, y, h0, saved, w_hh, lengths, mask)

    def backward(ctx, dy, dhn, _):
        _first_order_only(name)
        _check_saved(ctx, name)
        x, w_ih, y, h0, saved, w_hh, lengths, mask = ctx.saved_tensors
        zoneout = (mask, ctx.zoneout) if zoned else ()
        dx, dw_ih, dh0, dw_hh, db_ih, db_hh = getattr(torch.ops.rnnext, name + "_backward")(
            _zeros_if_none(dy, y), _zeros_if_none(dhn, h0), x, w_ih, y, h0, saved, w_hh, lengths, ctx.clip, ctx.path,
            *zoneout)
        return dx, dw_ih, dh0, dw_hh, *_bias_grads(ctx, db_ih, db_hh), *[None] * (6 if zoned else 4)

    torch.library.register_autograd(lib + name, backward, setup_context=setup)


def _autograd_rnn_seq(lib):
    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # else autograd zero-fills grads for outputs nobody used
        x, w_ih, h0, w_hh, b_ih, b_hh, lengths, ctx.nonlinearity, *rest = inputs
        ctx.clip = rest[0] if len(rest) > 0 else 0.0
        ctx.path = rest[1] if len(rest) > 1 else 0
        _biases(ctx, b_ih, b_hh)
        ctx.save_for_backward(x, w_ih, output[0], h0, w_hh, lengths)

    def backward(ctx, dy, dhn):
        _first_order_only("rnn_seq")
        x, w_ih, y, h0, w_hh, lengths = ctx.saved_tensors
        dx, dw_ih, dh0, dw_hh, db_ih, db_hh = torch.ops.rnnext.rnn_seq_backward(
            _zeros_if_none(dy, y), _zeros_if_none(dhn, h0), x, w_ih, y, h0, w_hh, lengths, ctx.nonlinearity,
            ctx.clip, ctx.path)
        return dx, dw_ih, dh0, dw_hh, *_bias_grads(ctx, db_ih, db_hh), *[None] * 4

    torch.library.register_autograd(lib + "rnn_seq", backward, setup_context=setup)


def _autograd_ln_seq(lib, name, lstm):
    """LayerNormLSTM (lstm: c0 and the cell state) and LayerNormGRU."""
    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        if lstm:
            x, w_ih, h0, c0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, *rest = inputs
            y, hn, cn, c_all, norm, rstd = output
            ctx.mark_non_differentiable(c_all, norm, rstd)
        else:
            x, w_ih, h0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, *rest = inputs
            c0 = c_all = None
            y, hn, norm, rstd = output
            ctx.mark_non_differentiable(norm, rstd)
        ctx.saved_gates = rest[2] if len(rest) > 2 else True
        mask = _options(ctx, rest[1:])  # (clip, save, path, mask, zoneout) after eps
        _biases(ctx, b_ih, b_hh)
        ctx.save_for_backward(x, w_ih, y, h0, c0, c_all, norm, rstd, w_hh, ln_w, ln_b, lengths, mask)

    def backward(ctx, dy, dhn, *rest):
        _first_order_only(name)
        _check_saved(ctx, name)
        x, w_ih, y, h0, c0, c_all, norm, rstd, w_hh, ln_w, ln_b, lengths, mask = ctx.saved_tensors
        common = (x, w_ih, y, h0)
        tail = (w_hh, ln_w, ln_b, lengths, ctx.clip, ctx.path, mask, ctx.zoneout)
        if lstm:
            dx, dw_ih, dh0, dc0, dw_hh, db_ih, db_hh, dln_w, dln_b = torch.ops.rnnext.lnlstm_seq_backward(
                _zeros_if_none(dy, y), _zeros_if_none(dhn, h0), _zeros_if_none(rest[0], c0), *common, c0, c_all, norm,
                rstd, *tail)
            return (dx, dw_ih, dh0, dc0, dw_hh, *_bias_grads(ctx, db_ih, db_hh), dln_w, dln_b, *[None] * 7)
        dx, dw_ih, dh0, dw_hh, db_ih, db_hh, dln_w, dln_b = torch.ops.rnnext.lngru_seq_backward(
            _zeros_if_none(dy, y), _zeros_if_none(dhn, h0), *common, norm, rstd, *tail)
        return (dx, dw_ih, dh0, dw_hh, *_bias_grads(ctx, db_ih, db_hh), dln_w, dln_b, *[None] * 7)

    torch.library.register_autograd(lib + name, backward, setup_context=setup)


def _autograd_cells(lib):
    """Cells whose hg gets the same gradient as xg (LSTM, lecture's GRU, RNN) and the GRU (separate)."""
    def save_state_and_saved(ctx, inputs, output):
        """What the *_cell_backward op takes after dhy: the previous state, (LSTM: cy,) saved."""
        ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(inputs[2], *output[1:])

    def lstm_backward(ctx, dhy, dcy, _):
        _first_order_only("lstm_cell")
        dgates, dcx = torch.ops.rnnext.lstm_cell_backward(dhy, dcy, *ctx.saved_tensors)
        return dgates, dgates, dcx

    def gru_backward(ctx, dhy, _):
        _first_order_only("gru_cell")
        return torch.ops.rnnext.gru_cell_backward(dhy, *ctx.saved_tensors)

    def mgru_backward(ctx, dhy, _):
        _first_order_only("mgru_cell")
        dgates, dhx = torch.ops.rnnext.mgru_cell_backward(dhy, *ctx.saved_tensors)
        return dgates, dgates, dhx

    def rnn_setup(ctx, inputs, output):
        ctx.nonlinearity = inputs[2]
        ctx.save_for_backward(output)

    def rnn_backward(ctx, dhy):
        _first_order_only("rnn_cell")
        dpre = torch.ops.rnnext.rnn_cell_backward(dhy, *ctx.saved_tensors, ctx.nonlinearity)
        return dpre, dpre, None

    torch.library.register_autograd(lib + "lstm_cell", lstm_backward, setup_context=save_state_and_saved)
    torch.library.register_autograd(lib + "gru_cell", gru_backward, setup_context=save_state_and_saved)
    torch.library.register_autograd(lib + "mgru_cell", mgru_backward, setup_context=save_state_and_saved)
    torch.library.register_autograd(lib + "rnn_cell", rnn_backward, setup_context=rnn_setup)


if LOAD_ERROR is None:
    _fake.register_keep_mask("rnnext::")
    _fake.register_cells("rnnext::")
    _fake.register_lstm_seq("rnnext::")
    _fake.register_gated_seq("rnnext::", "gru_seq", 3, 4)
    _fake.register_gated_seq("rnnext::", "mgru_seq", 2, 2)
    _fake.register_rnn_seq("rnnext::")
    _fake.register_ln_seq("rnnext::", "lnlstm_seq", 4, 5, lstm=True)
    _fake.register_ln_seq("rnnext::", "lngru_seq", 3, 6, lstm=False)
    _autograd_cells("rnnext::")
    _autograd_lstm_seq("rnnext::")
    _autograd_gated_seq("rnnext::", "gru_seq")
    _autograd_gated_seq("rnnext::", "mgru_seq")
    _autograd_rnn_seq("rnnext::")
    _autograd_ln_seq("rnnext::", "lnlstm_seq", lstm=True)
    _autograd_ln_seq("rnnext::", "lngru_seq", lstm=False)
