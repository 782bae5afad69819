"""Fused single-step cells vs torch.nn cells and rnnext.reference; op registration checks."""
import pytest
import torch
from torch import nn

import rnnext
from rnnext import ops, reference
from conftest import close, cpu_and_cuda, same_error

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")

CELLS = {"lstm": (rnnext.LSTMCell, nn.LSTMCell, {}), "gru": (rnnext.GRUCell, nn.GRUCell, {}),
         "rnn_tanh": (rnnext.RNNCell, nn.RNNCell, {"nonlinearity": "tanh"}),
         "rnn_relu": (rnnext.RNNCell, nn.RNNCell, {"nonlinearity": "relu"})}
G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def pair(kind, I, H, bias=True, device="cpu", dtype=torch.float64):
    ours_cls, theirs_cls, kw = CELLS[kind]
    ours = ours_cls(I, H, bias=bias, device=device, dtype=dtype, **kw)
    theirs = theirs_cls(I, H, bias=bias, device=device, dtype=dtype, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def hidden(kind, B, H, device, dtype, batched=True):
    shape = (B, H) if batched else (H,)
    h = torch.randn(shape, device=device, dtype=dtype)
    return (h, torch.randn(shape, device=device, dtype=dtype)) if kind == "lstm" else h


def leaves(x, hx):
    return [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])


def forward_and_grads(cell, x, hx):
    """Output(s) and gradients of a random projection of them w.r.t. input, hx and every parameter."""
    x = x.detach().requires_grad_()
    hx = None if hx is None else tuple(h.detach().requires_grad_() for h in hx) if isinstance(hx, tuple) \
        else hx.detach().requires_grad_()
    out = cell(x, hx)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves(x, hx) + list(cell.parameters()))
    return list(outs) + list(grads)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("B,I,H", [(1, 1, 1), (3, 5, 7), (4, 16, 13), (2, 3, 32)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("given_hx", [True, False])
def test_cell_matches_torch_fp64(device, kind, B, I, H, bias, given_hx):
    torch.manual_seed(B * 100 + I * 10 + H)
    ours, theirs = pair(kind, I, H, bias, device)
    x = torch.randn(B, I, device=device, dtype=torch.float64)
    hx = hidden(kind, B, H, device, torch.float64) if given_hx else None
    for a, b in zip(forward_and_grads(ours, x, hx), forward_and_grads(theirs, x, hx), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_unbatched_and_noncontiguous(device, kind):
    torch.manual_seed(3)
    ours, theirs = pair(kind, 6, 5, device=device)
    x = torch.randn(6, device=device, dtype=torch.float64)
    hx = hidden(kind, 1, 5, device, torch.float64, batched=False)
    for a, b in zip(forward_and_grads(ours, x, hx), forward_and_grads(theirs, x, hx), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    x = torch.randn(12, 4, device=device, dtype=torch.float64).t()[:, ::2]  # [4, 6], strided
    strided = lambda: torch.randn(5, 8, device=device, dtype=torch.float64).t()[::2]  # noqa: E731  [4, 5]
    hx = (strided(), strided()) if kind == "lstm" else strided()
    assert not x.is_contiguous()
    for a, b in zip(forward_and_grads(ours, x, hx), forward_and_grads(theirs, x, hx), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_fp32_within_1e5_of_fp64(device, kind):
    torch.manual_seed(4)
    ours, theirs = pair(kind, 24, 37, device=device)
    x = torch.randn(8, 24, device=device, dtype=torch.float64)
    hx = hidden(kind, 8, 37, device, torch.float64)
    want = forward_and_grads(theirs, x, hx)
    to32 = (lambda h: tuple(t.float() for t in h)) if kind == "lstm" else (lambda h: h.float())
    got = forward_and_grads(ours.float(), x.float(), to32(hx))
    for a, b in zip(got, want, strict=True):
        close(a.double(), b, rtol=1e-5)


LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_low_precision_rule(device, dtype, kind):
    """DESIGN.md: the largest error vs the fp64 cell at most twice torch.nn's at the same precision, plus 1e-3 of
    the tensor's largest value; outputs and every gradient."""
    torch.manual_seed(5)
    ours, theirs = pair(kind, 32, 48, device=device)
    x = torch.randn(16, 32, device=device, dtype=torch.float64)
    hx = hidden(kind, 16, 48, device, torch.float64)
    exact = forward_and_grads(theirs, x, hx)
    cast = (lambda h: tuple(t.to(dtype) for t in h)) if kind == "lstm" else (lambda h: h.to(dtype))
    got = forward_and_grads(ours.to(dtype), x.to(dtype), cast(hx))
    base = forward_and_grads(theirs.to(dtype), x.to(dtype), cast(hx))
    for g, b, e in zip(got, base, exact, strict=True):
        assert g.dtype == dtype
        err, base_err = (g.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err <= 2 * base_err + 1e-3 * e.abs().max().item(), (err, base_err)


def test_cell_detects_swapped_gates():
    """The parity tests can fail: a reference with LSTM gates (i, f) swapped disagrees with torch.nn."""
    torch.manual_seed(6)
    xg, hg = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    states = (torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    i, f, g, o = xg.chunk(4, 1)
    swapped = torch.cat([f, i, g, o], 1)
    good = ops.step("lstm", xg, hg, states)[1]
    assert (reference.step("lstm", swapped, hg, states)[1] - good).abs().max() > 1e-3
    torch.testing.assert_close(reference.step("lstm", xg, hg, states)[1], good)


# ---- the ops themselves ---------------------------------------------------------------------------

ALL = [c.name for c in rnnext.cells.CELLS.values() if not c.rows]  # every cell with a single-step op
G = {c: rnnext.cells.get(c).gates for c in ALL}
Z = {c: rnnext.cells.get(c).states for c in ALL}


def op_inputs(kind, B, H, device, dtype=torch.float64, requires_grad=True):
    """The cell op and (xg, hg, h, s)."""
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    s = t(Z[kind] - 1, B, H)
    if kind == "slstm":  # the normaliser n > 0 (n = 0, where the function jumps: tests/test_slstm.py)
        s[1] = s[1].abs() + 0.5
    args = (t(B, G[kind] * H), t(B, G[kind] * H), t(B, H), s)
    return getattr(torch.ops.rnnext, kind + "_cell"), tuple(a.requires_grad_(requires_grad) for a in args)


def states_of(h, s):
    return (h, *s.unbind(0))


def expected_saved(kind, xg, hg, s):
    """What each cell saves, from csrc/cells/<cell>.h: the activated gates (GRU: and hn; sLSTM: its exponential
    gates, sigmoid(-f~) and whether the stabiliser is i~), s the states but h."""
    if kind == "slstm":
        pi, pf, pz, po = (xg + hg).chunk(4, 1)
        n, m = s[1], s[2]
        a = torch.nn.functional.logsigmoid(pf) + m
        at_i = (n == 0) | (pi >= a)
        m_new = torch.where(at_i, pi, a)
        f = torch.where(n == 0, 0, (a - m_new).exp())
        return torch.cat([(pi - m_new).exp(), f, pz.tanh(), po.sigmoid(), (-pf).sigmoid(), at_i.to(xg.dtype)], 1)
    if kind == "lstm":
        i, f, g, o = (xg + hg).chunk(4, 1)
        return torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], 1)
    if kind == "gru":
        (xr, xz, xn), (hr, hz, hn) = xg.chunk(3, 1), hg.chunk(3, 1)
        r = (xr + hr).sigmoid()
        return torch.cat([r, (xz + hz).sigmoid(), (xn + r * hn).tanh(), hn], 1)
    if kind == "minimal_gru":
        u, c = (xg + hg).chunk(2, 1)
        return torch.cat([u.sigmoid(), c.tanh()], 1)
    return xg.new_empty(xg.size(0), 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", ALL)
def test_op_matches_reference(device, kind):
    torch.manual_seed(7)
    op, (xg, hg, h, s) = op_inputs(kind, 5, 11, device, requires_grad=False)
    h_new, s_new, saved = op(xg, hg, h, s)
    want = reference.step(kind, xg, hg, states_of(h, s))
    for a, b in zip(states_of(h_new, s_new), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(saved, expected_saved(kind, xg, hg, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", ALL)
def test_op_fp32_activations_over_float_range(device, kind):
    """The fp32 sigmoid/tanh (CPU: polynomial exp, see cpu/vec.h) within 1e-6 of float64 from -inf to
    inf, NaN kept: values drawn into every gate, in vector lanes and in the scalar tail (H = 37); zero hg
    and state, so that no sum in float32 cancels."""
    H, g = 37, G[kind]
    special = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-30, -1e-30, 0.624, 0.626, 88.5, -88.5,
               89.5, -89.5, 104.5, -104.5, 1e30, -1e30]
    values = torch.cat([torch.linspace(-120, 120, 4801, dtype=torch.float64),
                        torch.linspace(-1, 1, 1601, dtype=torch.float64), torch.tensor(special, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(3)
    rows = -(-3 * values.numel() // (g * H))  # each value three times, at random places, the rest random
    flat = torch.cat([values.repeat(3), values[torch.randint(values.numel(), (rows * g * H - 3 * values.numel(),),
                                                             generator=gen)]])
    xg = flat[torch.randperm(flat.numel(), generator=gen)].view(rows, g * H).float().double()  # float32's inputs
    hg, h = torch.zeros(rows, g * H, dtype=torch.float64), torch.zeros(rows, H, dtype=torch.float64)
    s = torch.zeros(Z[kind] - 1, rows, H, dtype=torch.float64)
    op = getattr(torch.ops.rnnext, kind + "_cell")
    h_new, s_new, saved = op(*[a.to(device, torch.float32) for a in (xg, hg, h, s)])
    ours = (*states_of(h_new, s_new), saved)
    theirs = (*reference.step(kind, xg, hg, states_of(h, s)), expected_saved(kind, xg, hg, s))
    assert any(o.isnan().any() for o in ours) and all(o.isfinite().any() for o in ours if o.numel())
    # The saved values are the activations themselves (the RNN's: its h): relative error everywhere. The
    # states combine them (the GRU's 1 - z cancels), so an absolute term of one float32 ulp at 1.
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        exact = k == len(ours) - 1 or kind.startswith("rnn")
        torch.testing.assert_close(a.cpu(), b.float(), rtol=1e-6, atol=1e-37 if exact else 1.2e-7, equal_nan=True)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", ALL)
def test_opcheck_forward(device, kind):
    torch.manual_seed(8)
    op, args = op_inputs(kind, 3, 5, device)
    torch.library.opcheck(op, args)
    op, args = op_inputs(kind, 3, 5, device, requires_grad=False)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", ALL)
def test_opcheck_backward(device, kind):
    torch.manual_seed(9)
    op, (xg, hg, h, s) = op_inputs(kind, 3, 5, device, requires_grad=False)
    h_new, s_new, saved = op(xg, hg, h, s)
    torch.library.opcheck(getattr(torch.ops.rnnext, kind + "_cell_backward"),
                          (torch.randn_like(h_new), torch.randn_like(s_new), h, s, h_new, saved))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", ALL)
def test_gradcheck(device, kind):
    """Every input's gradient (xg, hg, the states) through the cell op's autograd."""
    torch.manual_seed(10)
    op, args = op_inputs(kind, 2, 3, device)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[:2], args)


# ---- the modules' argument checks: torch.nn's errors ----------------------------------------------

@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_errors_match_torch(kind):
    ours, theirs = pair(kind, 4, 3, dtype=torch.float32)
    good_hx = hidden(kind, 2, 3, "cpu", torch.float32)
    cases = [
        (torch.randn(2, 5), None),                               # wrong input size
        (torch.randn(2, 4), hidden(kind, 3, 3, "cpu", torch.float32)),  # batch mismatch
        (torch.randn(2, 4), hidden(kind, 2, 5, "cpu", torch.float32)),  # hidden size mismatch
        (torch.randn(2, 3, 4), None),                            # 3-D input
        (torch.randn(2, 4), hidden(kind, 2, 3, "cpu", torch.float32, batched=True) if kind != "lstm"
         else tuple(h.unsqueeze(0) for h in good_hx)),           # 3-D hx (lstm) / fine (others)
        (torch.randn(2, 4, dtype=torch.float64), None),         # dtype mismatch
    ]
    for x, hx in cases:
        try:
            want = theirs(x, hx)
        except Exception:
            same_error(lambda: ours(x, hx), lambda: theirs(x, hx))
        else:  # what torch accepts, rnnext computes the same
            got = ours(x, hx)
            for a, b in zip(got if kind == "lstm" else (got,), want if kind == "lstm" else (want,), strict=True):
                close(a, b, 1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_autocast_dtype_like_torch(device, kind):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    ours, theirs = pair(kind, 8, 6, device=device, dtype=torch.float32)
    x = torch.randn(3, 8, device=device)
    with torch.autocast(device, dtype=dtype):
        got, want = ours(x), theirs(x)
    got, want = (got[0], want[0]) if kind == "lstm" else (got, want)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
