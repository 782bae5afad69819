"""The fused C++/CUDA ops (``torch.ops.rnnext.*``): fake kernels, autograd, and Python wrappers.

The wrappers have the same signatures as the cells in :mod:`rnnext.reference`, so the two are
interchangeable wherever a "cells" namespace is expected (``functional`` picks one per call).

Single-step cells; ``xg``/``hg`` are the input and hidden projections ``[B, G*H]`` (biases included):

- ``lstm_cell(xg, hg, cx) -> (hy, cy, saved)``
- ``gru_cell(xg, hg, hx) -> (hy, saved)``
- ``rnn_cell(xg, hg, nonlinearity) -> hy``

``saved`` is what backward needs, ``[B, 4*H]``: activated gates (i, f, g, o) for LSTM; (r, z, n, hn)
for GRU, where hn is the hidden part of n's pre-activation. It is not differentiable.
"""
import warnings

import torch

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

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernels run on ``t``'s device and dtype."""
    if LOAD_ERROR is not None or t.dtype not in DTYPES:
        return False
    if t.device.type == "cpu":
        return True
    return t.device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key("rnnext::lstm_cell", "CUDA")


def lstm_cell(xg, hg, cx):
    return torch.ops.rnnext.lstm_cell(xg, hg, cx)


def gru_cell(xg, hg, hx):
    return torch.ops.rnnext.gru_cell(xg, hg, hx)


def rnn_cell(xg, hg, nonlinearity):
    return torch.ops.rnnext.rnn_cell(xg, hg, nonlinearity)


def _state(x):  # kernels return contiguous tensors
    return x.new_empty(x.shape)


def _register():
    lib = "rnnext::"

    @torch.library.register_fake(lib + "lstm_cell")
    def _(xg, hg, cx):
        return _state(cx), _state(cx), _state(xg)

    @torch.library.register_fake(lib + "lstm_cell_backward")
    def _(dhy, dcy, cx, cy, saved):
        return _state(saved), _state(cx)

    @torch.library.register_fake(lib + "gru_cell")
    def _(xg, hg, hx):
        return _state(hx), hx.new_empty(hx.shape[0], 4 * hx.shape[1])

    @torch.library.register_fake(lib + "gru_cell_backward")
    def _(dhy, hx, saved):
        g = hx.new_empty(hx.shape[0], 3 * hx.shape[1])
        return g, _state(g), _state(hx)

    @torch.library.register_fake(lib + "rnn_cell")
    def _(xg, hg, nonlinearity):
        return _state(xg)

    @torch.library.register_fake(lib + "rnn_cell_backward")
    def _(dhy, hy, nonlinearity):
        return _state(hy)

    def lstm_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(inputs[2], output[1], output[2])

    def lstm_backward(ctx, dhy, dcy, _):
        cx, cy, saved = ctx.saved_tensors
        dgates, dcx = torch.ops.rnnext.lstm_cell_backward(dhy, dcy, cx, cy, saved)
        return dgates, dgates, dcx

    def gru_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[2], output[1])

    def gru_backward(ctx, dhy, _):
        hx, saved = ctx.saved_tensors
        return torch.ops.rnnext.gru_cell_backward(dhy, hx, saved)

    def rnn_setup(ctx, inputs, output):
        ctx.nonlinearity = inputs[2]
        ctx.save_for_backward(output)

    def rnn_backward(ctx, dhy):
        (hy,) = ctx.saved_tensors
        dpre = torch.ops.rnnext.rnn_cell_backward(dhy, hy, ctx.nonlinearity)
        return dpre, dpre, None

    torch.library.register_autograd(lib + "lstm_cell", lstm_backward, setup_context=lstm_setup)
    torch.library.register_autograd(lib + "gru_cell", gru_backward, setup_context=gru_setup)
    torch.library.register_autograd(lib + "rnn_cell", rnn_backward, setup_context=rnn_setup)


if LOAD_ERROR is None:
    _register()
