"""LayerNormLSTM (torchaudio's RNN-T formulation) and LayerNormGRU (Haste's): fused ops vs the reference, every
option of the layers. The layers and cells against those libraries' code, transcribed: test_oracles.py."""
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnext
from rnnext import cells, ops, reference
from conftest import gradcheck_recurrence, assert_low_precision_rule, close, cpu_and_cuda, outputs_and_grads

BUILT = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")
CELLS = {"LNLSTM": (4, 5, 2), "LNGRU": (3, 6, 1)}  # gates, norms' values per unit, zoneout parts
LAYERS = {"LNLSTM": rnnext.LayerNormLSTM, "LNGRU": rnnext.LayerNormGRU}


def make_args(mode, T, B, H, device, lengths, seed, I=4, dtype=torch.float64):
    G, N, _ = CELLS[mode]
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, sc=0.5: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(device, dtype)  # noqa: E731
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        lens = lens.to(device)
    leaf = lambda *s, sc=0.5: t(*s, sc=sc).requires_grad_()  # noqa: E731
    x, w_ih = leaf(T, B, I), leaf(G * H, I)
    states = (leaf(B, H), leaf(B, H)) if mode == "LNLSTM" else (leaf(B, H),)
    w_hh, b_ih, b_hh = leaf(G * H, H), leaf(G * H), leaf(G * H)
    params = ((1 + t(N * H, sc=0.3)).requires_grad_(), leaf(N * H, sc=0.3))
    return dict(cell=mode, x=x, w_ih=w_ih, w_hh=w_hh, states=states, b_ih=b_ih, b_hh=b_hh, params=params, lengths=lens)


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mode", list(CELLS))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("zoneout", ["none", "mask", "mixture"])
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (6, 4, 7), (3, 2, 33)])
def test_fused_matches_reference(device, mode, lengths, reverse, zoneout, T, B, H):
    args = make_args(mode, T, B, H, device, lengths, seed=T + B + H)
    g = torch.Generator().manual_seed(2)
    kw = dict(reverse=reverse, clip=0.8, eps=1e-4)
    if zoneout == "mask":
        kw["zoneout_mask"] = torch.bernoulli(torch.full((T, B, CELLS[mode][2] * H), 0.3, dtype=torch.float64),
                                             generator=g).to(device)
    elif zoneout == "mixture":
        kw["zoneout"] = 0.3
    got = outputs_and_grads(ops.recurrence, args, **kw)
    want = outputs_and_grads(reference.recurrence, args, **kw)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@BUILT
@pytest.mark.parametrize("mode", list(CELLS))
@pytest.mark.parametrize("lengths", [False, True])
def test_gradcheck_and_opcheck(mode, lengths):
    args = make_args(mode, 3, 2, 3, "cpu", lengths, seed=5)
    assert gradcheck_recurrence(ops.recurrence, args, eps=1e-3)
    a = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    h0, *rest = [s.detach() for s in args["states"]]
    s0 = torch.stack(rest) if rest else h0.new_empty(0, *h0.shape)
    param0, param1 = [p.detach() for p in args["params"]]
    name = cells.get(mode).name
    mask = torch.bernoulli(torch.full((3, 2, CELLS[mode][2] * 3), 0.5, dtype=torch.float64),
                           generator=torch.Generator().manual_seed(1))
    call = (a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], h0, s0, param0, param1, None, a["lengths"], mask, 0.0,
            0.5, 1e-3, True, 1)
    op = getattr(torch.ops.rnnext, name + "_seq")
    torch.library.opcheck(op, call)
    y, hn, sn, s_all, saved, stats, r = op(*call)
    d = lambda t: torch.randn_like(t)  # noqa: E731
    torch.library.opcheck(getattr(torch.ops.rnnext, name + "_seq_backward"),
                          (d(y), d(hn), d(sn), a["x"], a["w_ih"], a["w_hh"], h0, s0, param0, param1, None, a["lengths"],
                           mask, 0.0, 0.5, y, s_all, saved, stats, r, 1, [True] * 10))


def layer_outputs_and_grads(model, x, hx, backend):
    with rnnext.use_backend(backend):
        out, hidden = model(x, hx)
    data = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    outs = [data] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    g = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    xin = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
    return outs + list(torch.autograd.grad(loss, [xin] + list(model.parameters())))


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mode", list(CELLS))
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias",
                         list(itertools.product([1, 2], [False, True], [False, True], [True, False])))
def test_layer_options_fused_vs_reference(device, mode, num_layers, bidirectional, batch_first, bias):
    torch.manual_seed(num_layers + 2 * bidirectional + 4 * batch_first)
    model = LAYERS[mode](4, 5, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                         bias=bias, dropout=0.0, device=device, dtype=torch.float64)
    x = torch.randn((3, 6, 4) if batch_first else (6, 3, 4), device=device, dtype=torch.float64, requires_grad=True)
    got = layer_outputs_and_grads(model, x, None, "fused")
    want = layer_outputs_and_grads(model, x, None, "reference")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mode", list(CELLS))
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(device, mode, enforce_sorted):
    torch.manual_seed(8)
    model = LAYERS[mode](4, 5, bidirectional=True, device=device, dtype=torch.float64)
    lengths = [6, 4, 2] if enforce_sorted else [2, 6, 4]
    x = torch.randn(6, 3, 4, device=device, dtype=torch.float64)
    packed = pack_padded_sequence(x.requires_grad_(), lengths, enforce_sorted=enforce_sorted)
    got = layer_outputs_and_grads(model, packed, None, "fused")
    want = layer_outputs_and_grads(model, packed, None, "reference")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mode", list(CELLS))
def test_fp32_and_low_precision(no_tf32, device, mode):
    """The fused layers (on CUDA: the opt-in kernels) in float32: outputs, final states and every gradient within
    1e-5 (of each tensor's largest value) of the reference in float64; in bfloat16/float16: DESIGN.md's rule
    against the reference at the same dtype (RMS error at most twice its, plus 1e-4 of the exact RMS)."""
    torch.manual_seed(9)
    model = LAYERS[mode](8, 16, num_layers=2).to(device, torch.float64)
    x = torch.randn(10, 4, 8, device=device, dtype=torch.float64, requires_grad=True)
    exact = layer_outputs_and_grads(model, x, None, "reference")
    got32 = layer_outputs_and_grads(model.float(), x.detach().float().requires_grad_(), None, "fused")
    for a, b in zip(got32, exact, strict=True):
        close(a.double(), b, rtol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):  # DESIGN.md's rule, against the reference at the same dtype
        xl = x.detach().to(dtype).requires_grad_()
        got = layer_outputs_and_grads(model.to(dtype), xl, None, "fused")
        base = layer_outputs_and_grads(model.to(dtype), xl, None, "reference")
        assert_low_precision_rule(got, base, exact, dtype)


@pytest.mark.parametrize("mode", list(CELLS))
def test_cells_are_one_step_of_the_layer(mode):
    torch.manual_seed(10)
    cell = (rnnext.LayerNormLSTMCell if mode == "LNLSTM" else rnnext.LayerNormGRUCell)(4, 5).double()
    layer = LAYERS[mode](4, 5).double()
    assert all(not n.endswith("_l0") for n in cell.state_dict())  # a cell's names: weight_ih, ln_gates_weight, ...
    layer.load_state_dict({n + "_l0": v for n, v in cell.state_dict().items()})
    x = torch.randn(3, 4, dtype=torch.float64)
    h = torch.randn(3, 5, dtype=torch.float64)
    if mode == "LNLSTM":
        c = torch.randn(3, 5, dtype=torch.float64)
        got = cell(x, (h, c))
        _, (hn, cn) = layer(x[None], (h[None], c[None]))
        torch.testing.assert_close(got[0], hn[0]), torch.testing.assert_close(got[1], cn[0])
        torch.testing.assert_close(cell(x[0], (h[0], c[0]))[0], hn[0, 0])  # unbatched
    else:
        _, hn = layer(x[None], h[None])
        torch.testing.assert_close(cell(x, h), hn[0])
        torch.testing.assert_close(cell(x[0], h[0]), hn[0, 0])


@pytest.mark.parametrize("mode", list(CELLS))
def test_state_dict_compile_and_zoneout(mode):
    torch.manual_seed(11)
    model = LAYERS[mode](4, 5, num_layers=2, zoneout=0.2)
    other = LAYERS[mode](4, 5, num_layers=2, zoneout=0.2)
    other.load_state_dict(model.state_dict())
    x = torch.randn(6, 2, 4)
    model.eval(), other.eval()
    torch.testing.assert_close(model(x)[0], other(x)[0])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x)[0], model(x)[0])
    model.train()
    torch.manual_seed(1)
    first = model(x)[0]
    torch.manual_seed(1)
    assert torch.equal(model(x)[0], first)


def test_bad_arguments():
    with pytest.raises(ValueError, match="proj_size is not supported by LayerNormLSTM"):
        rnnext.LayerNormLSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="eps must be positive"):
        rnnext.LayerNormGRU(3, 4, eps=0.0)
    with pytest.raises(ValueError, match="LayerNormLSTMCell: Expected input to be 1D or 2D"):
        rnnext.LayerNormLSTMCell(3, 4)(torch.randn(2, 2, 3))


def test_norms_initialised_and_reset():
    m = rnnext.LayerNormLSTM(3, 4, bidirectional=True)
    names = {n for n, _ in m.named_parameters()}
    assert {"ln_gates_weight_l0", "ln_cell_bias_l0_reverse"} <= names
    assert torch.equal(m.ln_gates_weight_l0_reverse, torch.ones(16))
    with torch.no_grad():
        m.ln_cell_bias_l0.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.ln_cell_bias_l0, torch.zeros(4)) and torch.equal(m.ln_cell_weight_l0, torch.ones(4))


@pytest.mark.parametrize("backend", ["reference", pytest.param("fused", marks=BUILT)])
@pytest.mark.parametrize("mode", list(CELLS))
def test_unbatched_and_dropout(backend, mode):
    torch.manual_seed(12)
    model = LAYERS[mode](4, 5, num_layers=2, dropout=0.5).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    with rnnext.use_backend(backend):
        model.eval()
        y, hidden = model(x)  # unbatched: [T, I] -> [T, H]
        y_batched, _ = model(x.unsqueeze(1))
        torch.testing.assert_close(y, y_batched[:, 0])
        model.train()
        torch.manual_seed(3)
        first = model(x)[0]
        torch.manual_seed(3)
        assert torch.equal(model(x)[0], first)  # dropout between layers, seeded
        assert not torch.allclose(first, y)
