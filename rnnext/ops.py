"""The fused C++/CUDA ops (``torch.ops.rnnext.*``): fake kernels, autograd, and Python wrappers, for every cell
of :mod:`rnnext.cells` (the op schemas and their shapes: ``csrc/ops.cpp``, ``csrc/driver/sequence.h``).

The wrappers have the reference's signatures (:mod:`rnnext.reference`), so the two are interchangeable
wherever a backend is expected (``functional`` picks one per call):

- ``step(cell, xg, hg, states) -> new states`` on ``torch.ops.rnnext.<cell>_cell``: one step on the projections
  ``[B, G*H]`` (biases included); saved for backward: the states before, the new h and the cell's saved values;
- ``recurrence(cell, x, w_ih, w_hh, states, ...) -> (y, final states)`` on ``torch.ops.rnnext.<cell>_seq``:
  one layer-direction, input projection included. Saved for backward: the output ``y [T, B, P]`` and h0 (the
  states before each step are y[t-1]), the other states after each step ``[T, Z-1, B, H]`` and their initial
  values, the cell's saved values ``[T, B, SAVED*H]`` and stats, and with proj_size the cell outputs before
  the projection ``[T, B, H]``. Backward computes only the gradients autograd asks for.
"""
import warnings

import torch

from rnnext import _fake, cells
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


def others(states, cell):
    """A cell's states but h as the ops' s ``[Z-1, B, H]`` (``[0, B, H]`` for cells with one state)."""
    if cell.others:
        return torch.stack(tuple(states[1:]))
    h = states[0]
    return h.new_empty(0, *h.shape)


def step(cell, xg, hg, states):
    cell = cells.get(cell)
    h_new, s_new, _ = getattr(torch.ops.rnnext, cell.name + "_cell")(xg, hg, states[0], others(states, cell))
    return (h_new, *s_new.unbind(0))


def recurrence(cell, x, w_ih, w_hh, states, b_ih=None, b_hh=None, params=(), w_hr=None, lengths=None, reverse=False,
               clip=0.0, zoneout_mask=None, zoneout=0.0, eps=1e-5, path=0):
    """One layer-direction on the fused sequence op, input projection included; see
    :func:`rnnext.reference.recurrence`. path: 0 the device's default, 1 per step (a GEMM and a cell kernel
    per step), 2 the persistent kernel where it runs and fits (one launch, weights on chip), else per step."""
    cell = cells.get(cell)
    check_lengths(lengths, x.size(0))
    if reverse:
        x = flip_within(x, lengths)
    h0 = states[0]
    s0 = others(states, cell) if cell.others else h0.new_empty(0, h0.size(0), w_ih.size(0) // cell.gates)
    param0, param1 = (tuple(params) + (None, None))[:2]
    # Without a backward to follow (no_grad, or nothing requires grad), skip saving for it. Traced, always: the
    # trace records the flag as a constant, and torch.jit.trace's check traces again under no_grad.
    save = torch.jit.is_tracing() or torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh, *states, w_hr, *params))
    y, hn, sn = getattr(torch.ops.rnnext, cell.name + "_seq")(x, w_ih, w_hh, b_ih, b_hh, h0, s0, param0, param1, w_hr,
                                                               lengths, zoneout_mask, zoneout, clip, eps, save,
                                                               path)[:3]
    if reverse:
        y = flip_within(y, lengths)
    return y, (hn, *sn.unbind(0))


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


SEQ_DEFAULTS = dict(w_hr=None, lengths=None, zoneout_mask=None, zoneout=0.0, clip=0.0, eps=1e-5, save=True, path=0)


def _autograd_seq(lib, cell):
    name = cell.name + "_seq"

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # else autograd zero-fills [T, B, .] grads for saved outputs
        x, w_ih, w_hh, b_ih, b_hh, h0, s0, param0, param1, *rest = inputs
        opt = dict(SEQ_DEFAULTS)
        opt.update(zip(SEQ_DEFAULTS, rest))  # tracing may drop defaulted trailing arguments
        y, hn, sn, s_all, saved, stats, r = output
        ctx.mark_non_differentiable(s_all, saved, stats, r)
        ctx.given = (b_ih, b_hh, param0, param1, opt["w_hr"])
        ctx.given = tuple(t is not None for t in ctx.given)
        ctx.opt = opt
        ctx.save_for_backward(x, w_ih, w_hh, h0, s0, param0, param1, opt["w_hr"], opt["lengths"], opt["zoneout_mask"],
                              y, s_all, saved, stats, r)

    def backward(ctx, dy, dhn, dsn, *_):
        _first_order_only(name)
        opt = ctx.opt
        if not opt["save"]:
            raise RuntimeError(f"rnnext: {name} ran without saving for backward (save=False); "
                               "call it with save=True when a gradient is needed")
        x, w_ih, w_hh, h0, s0, param0, param1, w_hr, lengths, mask, y, s_all, saved, stats, r = ctx.saved_tensors
        need = (*ctx.needs_input_grad, *[False] * 10)  # the dispatcher drops trailing defaulted inputs
        has_b_ih, has_b_hh, has_p0, has_p1, has_w_hr = ctx.given
        mask_out = [need[0], need[1], need[2], need[3] and has_b_ih, need[4] and has_b_hh, need[5], need[6],
                    need[7] and has_p0, need[8] and has_p1, need[9] and has_w_hr]
        grads = getattr(torch.ops.rnnext, name + "_backward")(
            _zeros_if_none(dy, y), _zeros_if_none(dhn, h0), _zeros_if_none(dsn, s0), x, w_ih, w_hh, h0, s0, param0,
            param1, w_hr, lengths, mask, opt["zoneout"], opt["clip"], y, s_all, saved, stats, r, opt["path"], mask_out)
        return (*[g if m else None for g, m in zip(grads, mask_out)], *[None] * (len(SEQ_DEFAULTS) - 1))

    torch.library.register_autograd(lib + name, backward, setup_context=setup)


def _autograd_cell(lib, cell):
    name = cell.name + "_cell"
    G = cell.gates

    def setup(ctx, inputs, output):
        xg, hg, h, s = inputs
        h_new, s_new, saved = output
        ctx.mark_non_differentiable(saved)
        ctx.save_for_backward(h, s, h_new, saved)

    def backward(ctx, dh_new, ds_new, _):
        _first_order_only(name)
        h, s, h_new, saved = ctx.saved_tensors
        dgates, dh, ds = getattr(torch.ops.rnnext, name + "_backward")(
            _zeros_if_none(dh_new, h_new), _zeros_if_none(ds_new, s), h, s, h_new, saved)
        GH = G * h.size(1)
        return dgates[:, :GH], dgates[:, GH:] if cell.separate_hg else dgates, dh, ds

    torch.library.register_autograd(lib + name, backward, setup_context=setup)


if LOAD_ERROR is None:
    _fake.register_keep_mask("rnnext::")
    for _cell in cells.CELLS.values():
        _fake.register_seq("rnnext::", _cell)
        _autograd_seq("rnnext::", _cell)
        if not _cell.rows:
            _fake.register_cell("rnnext::", _cell)
            _autograd_cell("rnnext::", _cell)
