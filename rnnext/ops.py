"""The fused C++/CUDA ops (``torch.ops.rnnext.*``): fake kernels, autograd, and Python wrappers, for every cell
of :mod:`rnnext.cells` (the op schemas and their shapes: ``csrc/ops.cpp``, ``csrc/driver/sequence.h``).

The wrappers have the reference's signatures (:mod:`rnnext.reference`), so the two are interchangeable
wherever a backend is expected (``functional`` picks one per call):

- ``step(cell, xg, hg, states) -> new states`` on ``torch.ops.rnnext.<cell>_cell``: one step on the projections
  ``[B, G*H]`` (biases included); saved for backward: the states before, the new h and the cell's saved values,
  and for double backward xg and hg (references to them);
- ``recurrence(cell, x, w_ih, w_hh, states, ...) -> (y, final states)`` on ``torch.ops.rnnext.<cell>_seq``:
  one layer-direction, input projection included. Saved for backward: the output ``y [T, B, P]`` and h0 (the
  states before each step are y[t-1]), the other states after each step ``[T, Z-1, B, H]`` and their initial
  values, the cell's saved values ``[T, B, SAVED*H]`` and stats, and with proj_size the cell outputs before
  the projection ``[T, B, H]``; the inputs by reference. Backward computes only the gradients autograd asks for.

Double backward (``create_graph=True``): the backward ops have no derivatives of their own, so there the
backward recomputes the op with the reference from its saved inputs and differentiates that as a graph
(:func:`_reference_grads`); the first-order gradients are the same, and cost what the reference's do.
"""
import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode

from rnnext import _fake, cells, reference
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


class _FirstPassHooks(TorchFunctionMode):
    """The reference clips BPTT gradients with a hook on each step's h, and a hook fires in every backward through
    its tensor: in a higher-order pass through the recomputed forward it would clip that pass's gradients as well,
    which the derivative of the clipped first order does not. The hooks registered under this mode act until
    ``live`` is False."""

    live = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.register_hook:
            t, hook = args
            return func(t, lambda g: hook(g) if self.live else None)
        return func(*args, **(kwargs or {}))


def _reference_grads(run, inputs, want, grads, clip=0.0):
    """An op's gradients as a graph (create_graph=True; the backward ops have no derivatives of their own):
    run(*inputs) recomputes the op's differentiable outputs with the reference, autograd differentiates them
    against grads (None: no gradient) w.r.t. the inputs where want. Through aliases of the inputs: the op returns
    partial derivatives, and w.r.t. the saved tensors themselves autograd would add the paths between them (x
    computed from w_ih, one tensor passed as both biases) once more."""
    args = [t.view_as(t) if w else t for t, w in zip(inputs, want)]
    hooks = _FirstPassHooks()
    with hooks if clip > 0 else contextlib.nullcontext():  # a mode costs a Python call per op
        outs = run(*args)
    pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
    wrt = [a for a, w in zip(args, want) if w]
    got = [None] * len(wrt)
    if pairs and wrt:
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                  allow_unused=True)
    hooks.live = False
    got = iter(got)
    return [next(got) if w else None for w in want]


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
        # The biases only for double backward's recomputation: references to inputs, no copies
        ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, h0, s0, param0, param1, opt["w_hr"], opt["lengths"],
                              opt["zoneout_mask"], y, s_all, saved, stats, r)

    def backward(ctx, dy, dhn, dsn, *_):
        opt = ctx.opt
        if not opt["save"]:
            raise RuntimeError(f"rnnext: {name} ran without saving for backward (save=False); "
                               "call it with save=True when a gradient is needed")
        (x, w_ih, w_hh, b_ih, b_hh, h0, s0, param0, param1, w_hr, lengths, mask, y, s_all, saved, stats,
         r) = ctx.saved_tensors
        need = (*ctx.needs_input_grad, *[False] * 10)  # the dispatcher drops trailing defaulted inputs
        if torch.is_grad_enabled():  # create_graph=True
            def run(x, w_ih, w_hh, b_ih, b_hh, h0, s0, p0, p1, w_hr):
                # The op's own semantics: one direction, x already flipped by the caller, mask in step order
                y, states = reference.recurrence(cell, x, w_ih, w_hh, (h0, *s0.unbind(0)), b_ih, b_hh,
                                                 [p for p in (p0, p1) if p is not None], w_hr, lengths,
                                                 clip=opt["clip"], zoneout_mask=mask, zoneout=opt["zoneout"],
                                                 eps=opt["eps"])
                return (y, *states)

            inputs = (x, w_ih, w_hh, b_ih, b_hh, h0, s0, param0, param1, w_hr)
            grads = (dy, dhn, *([None] * cell.others if dsn is None else dsn.unbind(0)))
            got = _reference_grads(run, inputs, [n and t is not None for n, t in zip(need, inputs)], grads,
                                   opt["clip"])
            return (*got, *[None] * (len(SEQ_DEFAULTS) - 1))
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
        # xg and hg only for double backward's recomputation: the activations in saved cannot give them back (a
        # saturated sigmoid does not invert). It keeps [B, 2*G*H] a step alive, as torch's fused LSTM and GRU
        # cells keep their gates, for the same reason.
        ctx.save_for_backward(xg, hg, h, s, h_new, saved)

    def backward(ctx, dh_new, ds_new, _):
        xg, hg, h, s, h_new, saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grads = (dh_new, *([None] * cell.others if ds_new is None else ds_new.unbind(0)))
            return tuple(_reference_grads(lambda xg, hg, h, s: reference.step(cell, xg, hg, (h, *s.unbind(0))),
                                          (xg, hg, h, s), ctx.needs_input_grad, grads))
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
