"""Zoneout (Krueger et al. 2016) on the LSTM and GRU: fused ops vs the reference with the same masks, the
layers and cells vs an independent Python loop over torch.nn cells, training (masks) and eval (mixture)."""
import functools

import pytest
import torch
from torch import nn

import rnnext
from rnnext import functional, ops, reference
from conftest import (gradcheck_recurrence, RecordedMasks, assert_low_precision_rule, close, cpu_and_cuda,
                      outputs_and_grads)

BUILT = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")
MODES = {"LSTM": 2, "GRU": 1}  # mode: parts of the mask (h, c)


def make_args(mode, T, B, H, device, lengths, seed, I=3):
    g = torch.Generator().manual_seed(seed)
    G = 4 if mode == "LSTM" else 3
    t = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()  # noqa
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        lens = lens.to(device)
    mask = torch.bernoulli(torch.full((T, B, MODES[mode] * H), 0.3, dtype=torch.float64), generator=g).to(device)
    x, w_ih = t(T, B, I), t(G * H, I)
    states = (t(B, H), t(B, H)) if mode == "LSTM" else (t(B, H),)
    w_hh = t(G * H, H)
    return dict(cell=mode, x=x, w_ih=w_ih, w_hh=w_hh, states=states, b_ih=t(G * H), b_hh=t(G * H), lengths=lens), mask


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("path", [1, 2])
@pytest.mark.parametrize("kind", ["mask", "mixture"])
def test_fused_matches_reference(device, mode, lengths, reverse, path, kind):
    args, mask = make_args(mode, 7, 5, 9, device, lengths, seed=len(mode) + 3 * lengths)
    kw = dict(zoneout_mask=mask) if kind == "mask" else dict(zoneout=0.3)
    got = outputs_and_grads(functools.partial(ops.recurrence, path=path), args, reverse=reverse, clip=0.7, **kw)
    want = outputs_and_grads(reference.recurrence, args, reverse=reverse, clip=0.7, **kw)
    plain = outputs_and_grads(ops.recurrence, args, reverse=reverse, clip=0.7)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(got, plain))  # zoneout changed something


@BUILT
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("path", [1, 2])
def test_gradcheck(mode, path):
    args, mask = make_args(mode, 3, 2, 2, "cpu", True, seed=7)
    assert gradcheck_recurrence(ops.recurrence, args, zoneout_mask=mask, path=path)


def loop(cell_cls, model, x, train, p, masks):
    """An independent Python loop over torch.nn cells (one layer, one direction) with the masks rnnext draws
    (functional.zoneout_masks), or the mixture in eval."""
    cell = cell_cls(model.input_size, model.hidden_size).double()
    cell.weight_ih.data, cell.weight_hh.data = model.weight_ih_l0.data, model.weight_hh_l0.data
    cell.bias_ih.data, cell.bias_hh.data = model.bias_ih_l0.data, model.bias_hh_l0.data
    H = model.hidden_size
    h = c = x.new_zeros(x.size(1), H)
    ys = []
    for t in range(x.size(0)):
        if cell_cls is nn.LSTMCell:
            hn, cn = cell(x[t], (h, c))
            kh, kc = (masks[t].split(H, 1) if train else (p, p))
            h, c = kh * h + (1 - kh) * hn, kc * c + (1 - kc) * cn
        else:
            hn = cell(x[t], h)
            k = masks[t] if train else p
            h = k * h + (1 - k) * hn
        ys.append(h)
    return torch.stack(ys), h


@pytest.mark.parametrize("backend", ["reference", pytest.param("fused", marks=BUILT),
                                     pytest.param("persistent", marks=BUILT)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("train", [True, False])
def test_layer_matches_python_loop(backend, mode, train):
    torch.manual_seed(0)
    cls, cell_cls = (rnnext.LSTM, nn.LSTMCell) if mode == "LSTM" else (rnnext.GRU, nn.GRUCell)
    model = cls(4, 6, zoneout=0.25).double().train(train)
    x = torch.randn(8, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    with rnnext.use_backend(backend):
        y, hidden = model(x)
    torch.manual_seed(1)
    masks = functional.zoneout_masks(0.25, 8, 3, MODES[mode], 6, x)
    y_want, h_want = loop(cell_cls, model, x, train, 0.25, masks)
    close(y, y_want, 1e-10)
    close(hidden[0] if mode == "LSTM" else hidden, h_want.unsqueeze(0), 1e-10)
    gx, = torch.autograd.grad(y.square().sum(), x)
    gx_want, = torch.autograd.grad(y_want.square().sum(), x)
    close(gx, gx_want, 1e-10)


@pytest.mark.parametrize("mode", list(MODES))
def test_training_masks_are_seeded(mode):
    cls = rnnext.LSTM if mode == "LSTM" else rnnext.GRU
    model = cls(4, 6, num_layers=2, bidirectional=True, zoneout=0.5)
    x = torch.randn(5, 2, 4)
    torch.manual_seed(3)
    first = model(x)[0]
    torch.manual_seed(3)
    assert torch.equal(model(x)[0], first)
    assert not torch.equal(model(x)[0], first)  # a new mask
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])  # deterministic mixture


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("cell_cls,ours", [(nn.LSTMCell, rnnext.LSTMCell), (nn.GRUCell, rnnext.GRUCell)])
@pytest.mark.parametrize("train", [True, False])
def test_cells(device, cell_cls, ours, train):
    torch.manual_seed(4)
    cell = ours(3, 5, zoneout=0.4, device=device, dtype=torch.float64).train(train)
    theirs = cell_cls(3, 5, device=device, dtype=torch.float64)
    theirs.load_state_dict(cell.state_dict())
    x = torch.randn(2, 3, device=device, dtype=torch.float64)
    h = torch.randn(2, 5, device=device, dtype=torch.float64)
    hx = (h, torch.randn_like(h)) if cell_cls is nn.LSTMCell else h
    torch.manual_seed(5)
    got = cell(x, hx)
    new = theirs(x, hx)
    torch.manual_seed(5)
    pairs = list(zip(new, hx)) if cell_cls is nn.LSTMCell else [(new, hx)]
    want = [(k := functional.keep_mask(0.4, n.shape, n) if train else 0.4) * o + (1 - k) * n for n, o in pairs]
    for a, b in zip(got if isinstance(got, tuple) else (got,), want, strict=True):
        close(a, b, 1e-10)


def layer_outputs_and_grads(model, x, backend, masks):
    """Output, final states and the gradients of a random projection of them w.r.t. x and every parameter; in
    training the masks replayed from the start (the same for every dtype)."""
    masks.restart()
    x = x.detach().requires_grad_()
    with rnnext.use_backend(backend):
        y, hidden = model(x)
    outs = [y] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    return outs + list(torch.autograd.grad(loss, [x] + list(model.parameters())))


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(monkeypatch, device, mode, train, dtype):
    """DESIGN.md's 16-bit rule (conftest.assert_low_precision_rule) with zoneout 0.25, torch.nn having none: the
    fused layer's error vs the float64 reference at most twice the reference's own at dtype (training: the same
    masks for all three runs), outputs, final states and every gradient."""
    torch.manual_seed(7)
    cls = rnnext.LSTM if mode == "LSTM" else rnnext.GRU
    model = cls(16, 24, num_layers=2, bidirectional=True, zoneout=0.25).to(device, torch.float64).train(train)
    monkeypatch.setattr(functional, "keep_mask", masks := RecordedMasks(seed=8))
    x = torch.randn(12, 4, 16, device=device, dtype=torch.float64)
    exact = layer_outputs_and_grads(model, x, "reference", masks)
    model.to(dtype)
    got = layer_outputs_and_grads(model, x.to(dtype), "fused", masks)
    base = layer_outputs_and_grads(model, x.to(dtype), "reference", masks)
    assert len(masks.drawn) == (4 if train else 0)
    assert_low_precision_rule(got, base, exact, dtype)


def test_bad_zoneout():
    with pytest.raises(ValueError, match=r"zoneout must be in \[0, 1\], got 1.5"):
        rnnext.GRU(3, 4, zoneout=1.5)
    with pytest.raises(ValueError, match="zoneout is not supported with proj_size"):
        rnnext.LSTM(3, 4, proj_size=2, zoneout=0.1)
    with pytest.raises(TypeError):
        rnnext.RNN(3, 4, zoneout=0.1)
    with pytest.raises(ValueError, match=r"zoneout must be in \[0, 1\]"):
        rnnext.LSTMCell(3, 4, zoneout=-0.1)


@BUILT
def test_op_refuses_zoneout_with_projection():
    args, _ = make_args("LSTM", 3, 2, 4, "cpu", False, seed=1)
    w_hr = torch.randn(2, 4, dtype=torch.float64)
    h0 = torch.zeros(2, 2, dtype=torch.float64)
    c0 = args["states"][1].detach()
    with pytest.raises(RuntimeError, match="lstm_seq: zoneout with proj_size is not supported"):
        torch.ops.rnnext.lstm_seq(args["x"].detach(), args["w_ih"].detach(), args["w_hh"].detach()[:, :2], None, None,
                                  h0, c0[None], None, None, w_hr, zoneout=0.3)


@BUILT
def test_compile_fullgraph_with_zoneout():
    model = rnnext.LSTM(4, 6, zoneout=0.2)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(5, 2, 4)
    torch.manual_seed(0)
    want = model(x)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x)[0], want)


@BUILT
@pytest.mark.parametrize("size", [(1,), (7,), (3, 5, 7), (100, 32, 50)])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keep_mask_matches_transcription(size, p, dtype):
    """The CPU kernel and rnnext.reference.keep_mask agree bit for bit, on 1 thread and on 3."""
    for seed in (0, 12345678901, -2 ** 63, 2 ** 63 - 1):
        s = torch.tensor(seed, dtype=torch.int64)
        want = reference.keep_mask(s, size, p, dtype)
        assert want.shape == size and want.dtype == dtype
        before = torch.get_num_threads()
        try:
            for threads in (1, 3):
                torch.set_num_threads(threads)
                assert torch.equal(torch.ops.rnnext.keep_mask(s, list(size), p, dtype), want)
        finally:
            torch.set_num_threads(before)
        if p in (0.0, 1.0):
            assert torch.equal(want, torch.full(size, p, dtype=dtype))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_statistics(p):
    """Mean p, neighbours (within a 64-bit word, across words, across rows) uncorrelated: within 5 sigma."""
    n = 1 << 20
    torch.manual_seed(0)
    m = functional.keep_mask(p, (n,), torch.empty(0, dtype=torch.float64))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(m.mean().item() - p) < 5 * sigma
    c = m - p
    for lag in (1, 2, 512):
        assert abs((c[lag:] * c[:-lag]).mean().item()) < 5 * p * (1 - p) / n ** 0.5
    torch.manual_seed(0)
    assert torch.equal(functional.keep_mask(p, (n,), m), m)  # seeded by torch's generator
    assert not torch.equal(functional.keep_mask(p, (n,), m), m)  # a new draw


@BUILT
@pytest.mark.parametrize("seed,p,dtype", [
    (torch.zeros(2, dtype=torch.int64), 0.5, torch.float32),
    (torch.zeros((), dtype=torch.int32), 0.5, torch.float32),
    (torch.zeros(()), 0.5, torch.float32),
    (torch.zeros((), dtype=torch.int64), -0.1, torch.float32),
    (torch.zeros((), dtype=torch.int64), 1.5, torch.float32),
    (torch.zeros((), dtype=torch.int64), 0.5, torch.int32),
])
def test_keep_mask_bad_arguments(seed, p, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with pytest.raises(RuntimeError, match="keep_mask: expected") as eager:
        torch.ops.rnnext.keep_mask(seed, [4], p, dtype)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError) as fake:
        torch.ops.rnnext.keep_mask(mode.from_tensor(seed), [4], p, dtype)
    assert str(fake.value) == str(eager.value)
