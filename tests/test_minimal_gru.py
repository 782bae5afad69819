"""The lecture's GRU (update gate, no reset gate) against its formulas written out here, independently
of rnnext.reference: u = s(W_u [a, x]), c~ = tanh(W_c [a, x]), c = u*c~ + (1-u)*c'."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnext
from rnnext import ops, reference
from conftest import assert_low_precision_rule, close, cpu_and_cuda

BUILT = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")
BACKENDS = ["reference", pytest.param("fused", marks=BUILT)]


def lecture_step(x, a, w_ih, w_hh, b_ih, b_hh):
    H = a.size(-1)
    pre = x @ w_ih.t() + a @ w_hh.t()
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    u, cand = torch.sigmoid(pre[:, :H]), torch.tanh(pre[:, H:])
    return u * cand + (1 - u) * a


def lecture_layers(model, x, lengths=None):
    """x [T, B, I] time-major; lengths: per-sequence lengths (outputs past them are 0)."""
    T, B = x.shape[:2]
    D = 2 if model.bidirectional else 1
    lengths = torch.full((B,), T) if lengths is None else lengths
    h_n = []
    for layer in range(model.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(model, n + sfx, None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            y = torch.zeros(T, B, model.hidden_size, dtype=x.dtype)
            finals = []
            for b in range(B):
                n = int(lengths[b])
                a = torch.zeros(1, model.hidden_size, dtype=x.dtype)
                steps = range(n - 1, -1, -1) if d else range(n)
                for t in steps:
                    a = lecture_step(x[t, b:b + 1], a, *w)
                    y[t, b] = a[0]
                finals.append(a[0])
            outs.append(y)
            h_n.append(torch.stack(finals))
        x = torch.cat(outs, 2)
    return x, torch.stack(h_n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_layers,bidirectional,bias", [(1, False, True), (2, True, True), (2, False, False)])
def test_layer_matches_lecture_formulas(backend, num_layers, bidirectional, bias):
    torch.manual_seed(num_layers + 2 * bidirectional)
    model = rnnext.MinimalGRU(3, 5, num_layers=num_layers, bidirectional=bidirectional, bias=bias).double()
    assert model.weight_ih_l0.shape == (10, 3) and model.weight_hh_l0.shape == (10, 5)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    want_y, want_h = lecture_layers(model, x)
    with rnnext.use_backend(backend):
        y, h = model(x)
    close(y, want_y, 1e-10)
    close(h, want_h, 1e-10)
    lengths = torch.tensor([6, 2, 5, 1])
    want_y, want_h = lecture_layers(model, x, lengths)
    with rnnext.use_backend(backend):
        y, h = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(y)
    close(y, want_y[:6], 1e-10)
    close(h, want_h, 1e-10)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fused_gradients_match_reference(device):
    torch.manual_seed(3)
    model = rnnext.MinimalGRU(4, 7, num_layers=2, bidirectional=True, batch_first=True).to(device, torch.float64)
    x = torch.randn(3, 8, 4, device=device, dtype=torch.float64, requires_grad=True)
    grads = {}
    for backend in ("fused", "reference"):
        with rnnext.use_backend(backend):
            y, h = model(x)
        grads[backend] = torch.autograd.grad((y * y.detach().cos()).sum() + h.sum(), [x] + list(model.parameters()))
    for a, b in zip(grads["fused"], grads["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cell(device):
    torch.manual_seed(4)
    cell = rnnext.MinimalGRUCell(3, 5).to(device, torch.float64)
    x, a = torch.randn(2, 3, device=device, dtype=torch.float64), torch.randn(2, 5, device=device, dtype=torch.float64)
    want = lecture_step(x, a, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    close(cell(x, a), want, 1e-10)
    close(cell(x[0], a[0]), want[0], 1e-10)
    xg, hg = torch.randn(2, 10, device=device, dtype=torch.float64), torch.randn(2, 10, device=device,
                                                                                   dtype=torch.float64)
    want = reference.step("minimal_gru", xg, hg, (a,))
    for got, ref in zip(ops.step("minimal_gru", xg, hg, (a,)), want, strict=True):
        torch.testing.assert_close(got, ref)
    s = a.new_empty(0, *a.shape)
    args = tuple(t.requires_grad_() for t in (xg, hg, a)) + (s,)
    torch.library.opcheck(torch.ops.rnnext.minimal_gru_cell, args)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.rnnext.minimal_gru_cell(*t, s)[0], args[:3])
    torch.library.opcheck(torch.ops.rnnext.minimal_gru_cell_backward,
                          (torch.randn_like(a), s, a.detach(), s, torch.randn_like(a),
                           torch.rand(2, 10, device=device, dtype=torch.float64)))


def test_module_conveniences():
    m = rnnext.MinimalGRU(3, 4, state_grad_clip=0.5)
    assert "state_grad_clip=0.5" in repr(m)
    with pytest.raises(ValueError, match="proj_size"):
        rnnext.MinimalGRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="state_grad_clip"):
        rnnext.LSTM(3, 4, state_grad_clip=-1.0)
    m2 = rnnext.MinimalGRU(3, 4)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(m2(x)[0], m(x)[0])


def outputs_and_grads(model, x, backend):
    """Output, h_n and the gradients of a random projection of them w.r.t. x and every parameter."""
    x = x.detach().requires_grad_()
    with rnnext.use_backend(backend):
        y, h = model(x)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in (y, h))
    return [y, h] + list(torch.autograd.grad(loss, [x] + list(model.parameters())))


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fp32_within_1e5_of_fp64(no_tf32, device):
    """The fused float32 layer's outputs, h_n and every gradient within 1e-5 (of each tensor's largest value) of
    the reference in float64."""
    torch.manual_seed(5)
    model = rnnext.MinimalGRU(16, 24, num_layers=2, bidirectional=True).to(device, torch.float64)
    x = torch.randn(10, 4, 16, device=device, dtype=torch.float64)
    exact = outputs_and_grads(model, x, "reference")
    got = outputs_and_grads(model.float(), x.float(), "fused")
    for a, b in zip(got, exact, strict=True):
        assert a.dtype == torch.float32
        close(a.double(), b, 1e-5)


@BUILT
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(device, dtype):
    """DESIGN.md's 16-bit rule (conftest.assert_low_precision_rule), torch.nn having no such layer: the fused
    layer's error vs the float64 reference at most twice the reference's own at dtype, outputs, h_n and every
    gradient."""
    torch.manual_seed(6)
    model = rnnext.MinimalGRU(16, 24, num_layers=2, bidirectional=True).to(device, torch.float64)
    x = torch.randn(12, 4, 16, device=device, dtype=torch.float64)
    exact = outputs_and_grads(model, x, "reference")
    model.to(dtype)
    got = outputs_and_grads(model, x.to(dtype), "fused")
    base = outputs_and_grads(model, x.to(dtype), "reference")
    assert_low_precision_rule(got, base, exact, dtype)
