"""sLSTM (xLSTM) and head-wise recurrence (num_heads) behind the layers: against the equations written out here
(independently of rnnext.reference), torch.nn with the dense block-diagonal W_hh, and the reference; the
stabiliser's edge cases; the layers' arguments and errors. FlashRNN's own vanilla cells: tests/test_flashrnn.py."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnext
from rnnext import ops, reference
from conftest import assert_low_precision_rule, close, cpu_and_cuda

BUILT = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")
BACKENDS = ["reference", pytest.param("fused", marks=BUILT)]
F64 = torch.float64


def dense(w_hh, H):
    """The dense [G*H, H] W_hh of a head-wise [G*H, H/k] one, written out block by block."""
    D = w_hh.size(1)
    out = w_hh.new_zeros(w_hh.size(0), H)
    for row in range(w_hh.size(0)):
        head = row % H // D
        out[row, head * D:(head + 1) * D] = w_hh[row]
    return out


def paper_step(x, state, w_ih, w_hh, b_ih, b_hh):
    """One sLSTM step of one sequence, element by element from the equations (xLSTM's, with the empty-state
    rule per element): state (h, c, n, m) [H] each."""
    h, c, n, m = state
    H = h.numel()
    pre = (w_ih @ x + dense(w_hh, H) @ h).detach()
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    out = [torch.empty(H, dtype=x.dtype) for _ in range(4)]
    for u in range(H):
        pi, pf, pz, po = (float(pre[g * H + u]) for g in range(4))
        lf = -math.log1p(math.exp(-pf)) if pf > 0 else pf - math.log1p(math.exp(pf))
        if float(n[u]) == 0:
            m_new, f = pi, 0.0
        else:
            m_new = max(pi, lf + float(m[u]))
            f = math.exp(lf + float(m[u]) - m_new)
        i = math.exp(pi - m_new)
        c_new = f * float(c[u]) + i * math.tanh(pz)
        n_new = f * float(n[u]) + i
        out[0][u] = 1 / (1 + math.exp(-po)) * c_new / n_new
        out[1][u], out[2][u], out[3][u] = c_new, n_new, m_new
    return out


def paper_layers(model, x, hx=None, lengths=None):
    """The layer from paper_step: x [T, B, I] time-major; per layer and direction, each sequence within its
    length. Returns (output, (h_n, c_n, n_n, m_n))."""
    T, B = x.shape[:2]
    D, H = 2 if model.bidirectional else 1, model.hidden_size
    lengths = [T] * B if lengths is None else [int(v) for v in lengths]
    finals = [[] for _ in range(4)]
    for layer in range(model.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(model, n + sfx, None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            y = torch.zeros(T, B, H, dtype=x.dtype)
            ends = [[] for _ in range(4)]
            for b in range(B):
                k = layer * D + d
                state = [torch.zeros(H, dtype=x.dtype) for _ in range(4)] if hx is None else [s[k, b] for s in hx]
                for t in (range(lengths[b] - 1, -1, -1) if d else range(lengths[b])):
                    state = paper_step(x[t, b], state, *w)
                    y[t, b] = state[0]
                for into, s in zip(ends, state):
                    into.append(s)
            outs.append(y)
            for into, s in zip(finals, ends):
                into.append(torch.stack(s))
        x = torch.cat(outs, 2)
    return x, tuple(torch.stack(f) for f in finals)


def states(L, B, H, seed, empty_units=False):
    """Random (h0, c0, n0, m0) [L, B, H] with n0 > 0, or n0 = 0 in every third unit (empty_units)."""
    g = torch.Generator().manual_seed(seed)
    h, c, n, m = (torch.randn(L, B, H, generator=g, dtype=F64) for _ in range(4))
    n = n.abs() + 0.3
    if empty_units:
        n = n * (torch.arange(H) % 3 != 0)
    return h, c, n, m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_layers,bidirectional,bias,heads", [(1, False, True, 1), (2, True, True, 3),
                                                                  (2, False, False, 2), (1, True, True, 6)])
@pytest.mark.parametrize("given_hx", [False, True])
def test_layer_matches_equations(backend, num_layers, bidirectional, bias, heads, given_hx):
    torch.manual_seed(num_layers + 2 * bidirectional + heads)
    model = rnnext.sLSTM(3, 6, num_layers=num_layers, bidirectional=bidirectional, bias=bias,
                         num_heads=heads).double()
    assert model.weight_ih_l0.shape == (24, 3) and model.weight_hh_l0.shape == (24, 6 // heads)
    x = torch.randn(5, 4, 3, dtype=F64) * 2
    hx = states(num_layers * (1 + bidirectional), 4, 6, 0, empty_units=True) if given_hx else None
    want_y, want_s = paper_layers(model, x, hx)
    with rnnext.use_backend(backend):
        y, got_s = model(x, hx)
    close(y, want_y, 1e-10)
    for a, b in zip(got_s, want_s, strict=True):
        close(a, b, 1e-10)
    lengths = torch.tensor([5, 2, 4, 1])
    want_y, want_s = paper_layers(model, x, hx, lengths)
    with rnnext.use_backend(backend):
        y, got_s = model(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
    close(pad_packed_sequence(y)[0], want_y, 1e-10)
    for a, b in zip(got_s, want_s, strict=True):
        close(a, b, 1e-10)


def outputs_and_grads(model, x, hx, backend, batch_first=False):
    """Output, the four final states and the gradients of a random projection of them w.r.t. x, hx and every
    parameter."""
    x = x.detach().requires_grad_()
    hx = tuple(h.detach().requires_grad_() for h in hx)
    with rnnext.use_backend(backend):
        y, finals = model(x, hx)
    g = torch.Generator().manual_seed(1)
    outs = [y, *finals]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(o)).sum() for o in outs)
    return outs + list(torch.autograd.grad(loss, [x, *hx] + list(model.parameters())))


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("T,B,H", [(1, 1, 4), (6, 3, 12), (9, 2, 20)])
def test_fused_gradients_match_reference(device, heads, T, B, H):
    """Every gradient, the initial states' included (n0 > 0: the function jumps where n0 = 0), fused vs the
    reference in float64, bidirectional, batch_first."""
    torch.manual_seed(T + H)
    model = rnnext.sLSTM(5, H, num_layers=2, bidirectional=True, batch_first=True, num_heads=heads).to(device, F64)
    x = torch.randn(B, T, 5, device=device, dtype=F64)
    hx = tuple(s.to(device) for s in states(4, B, H, 2))
    got, want = (outputs_and_grads(model, x, hx, b) for b in ("fused", "reference"))
    for a, b in zip(got, want, strict=True):
        close(a, b, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_and_extreme_gates_in_float32(backend):
    """From the zero state the first step is h = sigmoid(o~)*tanh(z~), c = tanh(z~), n = 1, m = i~, whatever i~
    and f~; i~ and f~ of +-80 (exp overflows float32 past 88) give no inf or NaN, and n stays >= 1."""
    H = 8
    model = rnnext.sLSTM(1, H, bias=False)
    with torch.no_grad():
        model.weight_hh_l0.zero_()
        model.weight_ih_l0.copy_(torch.tensor([80.0, -80.0, 80.0, -80.0, 1.0, -1.0, 0.5, 0.0] * 4).view(4 * H, 1))
    x = torch.tensor([[[1.0]], [[-1.0]], [[1.0]], [[1.0]]])
    with rnnext.use_backend(backend):
        y, (h, c, n, m) = model(x)
    p = model.weight_ih_l0.view(4, H)
    torch.testing.assert_close(y[0, 0], p[3].sigmoid() * p[2].tanh())
    with rnnext.use_backend(backend):
        _, (h1, c1, n1, m1) = model(x[:1])
    torch.testing.assert_close(c1[0, 0], p[2].tanh())
    torch.testing.assert_close(n1[0, 0], torch.ones(H))
    torch.testing.assert_close(m1[0, 0], p[0])
    assert y.isfinite().all() and all(s.isfinite().all() for s in (h, c, n, m))
    assert (n >= 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_units_restart(backend):
    """A given state with n0 = 0 in some units: those units start afresh (their c0 and m0 ignored), the others
    carry theirs; gradients: none into c0, n0, m0 of the empty units."""
    torch.manual_seed(3)
    model = rnnext.sLSTM(2, 6).double()
    x = torch.randn(3, 2, 2, dtype=F64)
    hx = [s.requires_grad_() for s in states(1, 2, 6, 4, empty_units=True)]
    with rnnext.use_backend(backend):
        y, finals = model(x, tuple(hx))
    other = tuple(s.detach().clone() for s in hx)
    other[1][..., ::3] = 5.0  # c0 and m0 of the empty units: no effect
    other[3][..., ::3] = -7.0
    with rnnext.use_backend(backend):
        y2, _ = model(x, other)
    close(y2, y, 1e-12)
    grads = torch.autograd.grad(y.sum() + sum(f.sum() for f in finals), hx)
    for g in grads[1:]:
        assert (g[..., ::3] == 0).all() and (g[..., 1::3] != 0).all()


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(device, dtype):
    """DESIGN.md's 16-bit rule against the reference at dtype (torch.nn has no sLSTM): outputs, states and
    every gradient."""
    torch.manual_seed(6)
    model = rnnext.sLSTM(16, 24, num_layers=2, bidirectional=True, num_heads=4).to(device, F64)
    x = torch.randn(12, 4, 16, device=device, dtype=F64)
    hx = tuple(s.to(device) for s in states(4, 4, 24, 5))
    exact = outputs_and_grads(model, x, hx, "reference")
    model.to(dtype)
    low = tuple(s.to(dtype) for s in hx)
    got = outputs_and_grads(model, x.to(dtype), low, "fused")
    base = outputs_and_grads(model, x.to(dtype), low, "reference")
    assert_low_precision_rule(got, base, exact, dtype)


# ---- head-wise LSTM, GRU, RNN ------------------------------------------------------------------

LAYERS = {"LSTM": (rnnext.LSTM, nn.LSTM), "GRU": (rnnext.GRU, nn.GRU), "RNN": (rnnext.RNN, nn.RNN)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("heads,H", [(1, 6), (2, 6), (3, 6), (6, 6), (4, 12)])
def test_heads_match_torch_with_dense_block_diagonal(backend, kind, heads, H):
    """num_heads=k equals torch.nn's layer with W_hh the dense block-diagonal matrix of the k blocks: outputs,
    final states and gradients (W_hh's: the diagonal blocks of torch.nn's)."""
    ours_cls, torch_cls = LAYERS[kind]
    torch.manual_seed(heads + H)
    ours = ours_cls(3, H, num_layers=2, bidirectional=True, num_heads=heads).double()
    theirs = torch_cls(3, H, num_layers=2, bidirectional=True).double()
    state = {k: dense(v, H) if k.startswith("weight_hh") else v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    with rnnext.use_backend(backend):
        y, hn = ours(x)
    y2, hn2 = theirs(x)
    close(y, y2, 1e-10)
    for a, b in zip(hn if kind == "LSTM" else (hn,), hn2 if kind == "LSTM" else (hn2,)):
        close(a, b, 1e-10)
    loss = (y * y.detach().cos()).sum()
    loss2 = (y2 * y2.detach().cos()).sum()
    got = torch.autograd.grad(loss, [x] + list(ours.parameters()))
    want = torch.autograd.grad(loss2, [x] + list(theirs.parameters()))
    for (name, _), a, b in zip([("x", None)] + list(ours.named_parameters()), got, want, strict=True):
        if name.startswith("weight_hh"):
            b = torch.stack([b[r, r % H // (H // heads) * (H // heads):][:H // heads] for r in range(b.size(0))])
        close(a, b, 1e-10)


def test_one_head_is_todays_layer():
    """num_heads=1: torch.nn's parameter shapes and state_dict, the same outputs."""
    torch.manual_seed(0)
    ours, plain = rnnext.LSTM(3, 8, num_heads=1), rnnext.LSTM(3, 8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert "num_heads" not in repr(ours) and "num_heads=2" in repr(rnnext.GRU(3, 8, num_heads=2))
    ours.load_state_dict(nn.LSTM(3, 8).state_dict())


def test_errors():
    with pytest.raises(ValueError, match=r"hidden_size \(6\) must be divisible by num_heads \(4\)"):
        rnnext.LSTM(3, 6, num_heads=4)
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        rnnext.sLSTM(3, 6, num_heads=0)
    with pytest.raises(ValueError, match="num_heads is not supported with proj_size"):
        rnnext.LSTM(3, 6, num_heads=2, proj_size=2)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        rnnext.sLSTM(3, 6, proj_size=2)
    with pytest.raises(ValueError, match="must be divisible"):
        rnnext.sLSTMCell(3, 6, num_heads=4)
    model = rnnext.sLSTM(3, 6)
    x = torch.randn(4, 2, 3)
    with pytest.raises(RuntimeError, match="four tensors"):
        model(x, (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[2\] \(n0\) size \(1, 2, 6\), got \[1, 3, 6\]"):
        model(x, (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6), torch.zeros(1, 3, 6), torch.zeros(1, 2, 6)))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        model(torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="sLSTM: Expected input to be 2D or 3D, got 4D"):
        model(torch.randn(4, 2, 3, 1))
    with pytest.raises(ValueError, match="rnnext.to_torch: torch.nn has no equivalent for .*num_heads=2"):
        rnnext.to_torch(nn.Sequential(rnnext.GRU(3, 4, num_heads=2)))
    with pytest.raises(ValueError, match="no equivalent for .*sLSTM"):
        rnnext.to_torch(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_batch_first_and_cell(backend):
    """Unbatched input and hx, batch_first, and sLSTMCell: all the same steps as the layer."""
    torch.manual_seed(1)
    model = rnnext.sLSTM(3, 4, batch_first=True, num_heads=2).double()
    x = torch.randn(5, 3, dtype=F64)
    hx = tuple(s[:, 0] for s in states(1, 1, 4, 3))
    with rnnext.use_backend(backend):
        y, finals = model(x, hx)
        yb, finals_b = model(x.unsqueeze(0), tuple(s.unsqueeze(1) for s in hx))
    assert y.shape == (5, 4) and all(f.shape == (1, 4) for f in finals)
    close(y, yb[0], 1e-12)
    cell = rnnext.sLSTMCell(3, 4, num_heads=2).double()
    cell.load_state_dict({k[:-3]: v for k, v in model.state_dict().items()})
    state = tuple(s[0] for s in hx)
    with rnnext.use_backend(backend):
        for t in range(5):
            state = cell(x[t], state)
            close(state[0], y[t], 1e-12)
        batched = cell(x[:1], tuple(s[0:1] for s in hx))
        zero = cell(x[:1])
    for a, b in zip(state, finals):
        close(a, b[0], 1e-12)
    close(batched[0][0], y[0], 1e-12)
    close(zero[1][0], paper_step(x[0], [torch.zeros(4, dtype=F64)] * 4, cell.weight_ih, cell.weight_hh,
                                 cell.bias_ih, cell.bias_hh)[1], 1e-12)


@BUILT
def test_compiles_without_graph_breaks():
    torch.manual_seed(2)
    model = rnnext.sLSTM(3, 8, num_layers=2, num_heads=2)
    x = torch.randn(6, 2, 3)
    want = model(x)[0]
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    close(compiled(x)[0], want, 1e-6)


def test_reference_hidden_is_the_dense_product():
    torch.manual_seed(4)
    w, h = torch.randn(12, 2, dtype=F64), torch.randn(3, 6, dtype=F64)
    close(reference.hidden(h, w), h @ dense(w, 6).t(), 1e-14)
    close(reference.dense_heads(w, 6), dense(w, 6), 0)


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "sLSTM"])
@pytest.mark.parametrize("heads,H", [(5, 40), (2, 40), (8, 40), (3, 48)])
def test_heads_fp32_within_1e5_of_fp64(no_tf32, device, kind, heads, H):
    """float32, where the CPU's fused step GEMMs run (per head: only the diagonal blocks; heads of 8, 20, 5 and 16
    units, which the threads' blocks of units cut through), against the reference in float64: outputs, final
    states and every gradient, bidirectional, with lengths."""
    torch.manual_seed(heads + H)
    cls = rnnext.sLSTM if kind == "sLSTM" else LAYERS[kind][0]
    model = cls(7, H, num_layers=2, bidirectional=True, num_heads=heads).to(device, F64)
    x = torch.randn(9, 3, 7, device=device, dtype=F64)
    lengths = torch.tensor([9, 4, 7])

    def run(m, x, backend):
        x = x.detach().requires_grad_()
        with rnnext.use_backend(backend):
            y, finals = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
        finals = finals if isinstance(finals, tuple) else (finals,)
        y = pad_packed_sequence(y)[0]
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(o)).sum() for o in (y, *finals))
        return [y, *finals, *torch.autograd.grad(loss, [x] + list(m.parameters()))]

    exact = run(model, x, "reference")
    got = run(model.float(), x.float(), "fused")
    for a, b in zip(got, exact, strict=True):
        assert a.dtype == torch.float32
        close(a.double(), b, 1e-5)
