"""The fused sequence ops (one layer-direction) vs rnnext.reference.recurrence, on both paths (1: per step;
2: persistent where it has a plan, which float64 never has: here path 2 tests the fallback to per step, id
2-fallback; the persistent kernels themselves: tests/test_persistent.py); op registration checks."""
import functools

import pytest
import torch

from rnnext import ops, reference
import conftest
from conftest import close, cpu_and_cuda

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")

# name: (mode, gates, proj_size, nonlinearity)
CASES = {"lstm": ("LSTM", 4, 0, "tanh"), "lstm_proj": ("LSTM", 4, 3, "tanh"), "gru": ("GRU", 3, 0, "tanh"),
         "mgru": ("MGRU", 2, 0, "tanh"), "rnn_tanh": ("RNN", 1, 0, "tanh"), "rnn_relu": ("RNN", 1, 0, "relu")}


def make_args(case, T, B, H, device, dtype=torch.float64, bias=True, lengths=False, seed=0):
    """Leaf tensors for recurrence(mode, x, w_ih, h0, c0, w_hh, b_ih, b_hh, w_hr, lengths, ...); input size 3."""
    mode, G, P, _ = CASES[case]
    P = P or H
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(device, dtype).requires_grad_()  # noqa
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        lens = lens.to(device)
    return dict(mode=mode, x=t(T, B, 3), w_ih=t(G * H, 3), h0=t(B, P), c0=t(B, H) if mode == "LSTM" else None, w_hh=t(G * H, P),
                b_ih=t(G * H) if bias else None, b_hh=t(G * H) if bias else None, w_hr=t(P, H) if CASES[case][2] else None, lengths=lens,
                nonlinearity=CASES[case][3])


PATHS = [1, pytest.param(2, id="2-fallback")]


def fused(path):
    return functools.partial(ops.recurrence, path=path)


def outputs_and_grads(fn, args, reverse, clip=0.0, plain_sum=False):
    return conftest.outputs_and_grads(fn, args, plain_sum, reverse=reverse, clip=clip)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (7, 5, 9), (12, 3, 20)])
@pytest.mark.parametrize("path", PATHS)
def test_matches_reference(device, case, lengths, reverse, bias, T, B, H, path):
    args = make_args(case, T, B, H, device, bias=bias, lengths=lengths, seed=T + B + H)
    got = outputs_and_grads(fused(path), args, reverse)
    want = outputs_and_grads(reference.recurrence, args, reverse)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_padding_is_zero_and_state_carries(device, case, path):
    args = make_args(case, 6, 4, 5, device, lengths=True, seed=3)
    y, h, _ = fused(path)(**args)
    lens = args["lengths"].tolist()
    for b, n in enumerate(lens):
        assert torch.all(y[n:, b] == 0)
        torch.testing.assert_close(h[b], y[n - 1, b])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_deterministic(device, case, path):
    args = make_args(case, 9, 6, 33, device, dtype=torch.float32, lengths=True, seed=4)
    first = outputs_and_grads(fused(path), args, False)
    second = outputs_and_grads(fused(path), args, False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def op_call(case, args, path, clip=0.25, save=True):
    """The forward op and all its positional arguments."""
    a = args
    if a["mode"] == "LSTM":
        return torch.ops.rnnext.lstm_seq, (a["x"], a["w_ih"], a["h0"], a["c0"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
                                           a["lengths"], clip, save, path)
    if a["mode"] in ("GRU", "MGRU"):
        op = torch.ops.rnnext.gru_seq if a["mode"] == "GRU" else torch.ops.rnnext.mgru_seq
        return op, (a["x"], a["w_ih"], a["h0"], a["w_hh"], a["b_ih"], a["b_hh"], a["lengths"], clip, save, path)
    return torch.ops.rnnext.rnn_seq, (a["x"], a["w_ih"], a["h0"], a["w_hh"], a["b_ih"], a["b_hh"], a["lengths"],
                                      a["nonlinearity"], clip, path)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_opcheck(device, case, lengths, path):
    args = make_args(case, 4, 3, 5, device, lengths=lengths, seed=5)
    op, inputs = op_call(case, args, path)
    torch.library.opcheck(op, inputs)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_opcheck_backward(device, case, lengths, path):
    args = make_args(case, 4, 3, 5, device, lengths=lengths, seed=6)
    op, inputs = op_call(case, args, path)
    with torch.no_grad():
        out = op(*inputs)
    a = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    d = lambda t: torch.randn_like(t)  # noqa: E731
    if a["mode"] == "LSTM":
        y, hn, cn, c_all, saved, r = out
        torch.library.opcheck(torch.ops.rnnext.lstm_seq_backward,
                              (d(y), d(hn), d(cn), a["x"], a["w_ih"], y, a["h0"], a["c0"], c_all, saved, r,
                               a["w_hh"], a["w_hr"], a["lengths"], 0.25, path))
    elif a["mode"] in ("GRU", "MGRU"):
        y, hn, saved = out
        torch.library.opcheck(getattr(torch.ops.rnnext, a["mode"].lower() + "_seq_backward"),
                              (d(y), d(hn), a["x"], a["w_ih"], y, a["h0"], saved, a["w_hh"], a["lengths"], 0.25,
                               path))
    else:
        y, hn = out
        torch.library.opcheck(torch.ops.rnnext.rnn_seq_backward,
                              (d(y), d(hn), a["x"], a["w_ih"], y, a["h0"], a["w_hh"], a["lengths"], a["nonlinearity"],
                               0.25, path))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(device, case, lengths, path):
    args = make_args(case, 3, 2, 2, device, lengths=lengths, seed=7)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def f(*tensors):
        kw = dict(args, **dict(zip(names, tensors)))
        y, h, c = fused(path)(**kw)
        return (y, h) if c is None else (y, h, c)

    assert torch.autograd.gradcheck(f, [args[k] for k in names])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_state_grad_clip_matches_reference(device, case, lengths, reverse, path):
    """In-kernel BPTT clipping clamps the same quantity as the reference's hook on each step's state."""
    args = make_args(case, 9, 4, 6, device, lengths=lengths, seed=11)
    args["x"] = (args["x"] * 6).detach().requires_grad_()  # saturate some gates: large gradients
    clip = 0.05
    got = outputs_and_grads(fused(path), args, reverse, clip)
    want = outputs_and_grads(reference.recurrence, args, reverse, clip)
    unclipped = outputs_and_grads(fused(path), args, reverse)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    n_out = 3 if CASES[case][0] == "LSTM" else 2
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(got[n_out:], unclipped[n_out:]))  # clipping acted
    for a, b in zip(got[:n_out], unclipped[:n_out]):
        assert torch.equal(a, b)  # forward untouched


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", ["lstm", "lstm_proj", "gru", "mgru"])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_save_false_skips_saving_only(device, case, lengths, path):
    """save=False (what a no_grad forward uses): same outputs, nothing saved; backward refuses."""
    args = make_args(case, 5, 3, 4, device, lengths=lengths, seed=12)
    op, full_call = op_call(case, args, path, 0.0, True)
    op, light_call = op_call(case, args, path, 0.0, False)
    full = op(*full_call)
    light = op(*light_call)
    n_out = 3 if CASES[case][0] == "LSTM" else 2
    for a, b in zip(full[:n_out], light[:n_out]):
        assert torch.equal(a, b)
    assert all(t.size(0) == 0 for t in light[n_out:n_out + (2 if CASES[case][0] == "LSTM" else 1)])
    torch.library.opcheck(op, tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in light_call))
    with pytest.raises(RuntimeError, match="without saving for backward"):
        light[0].sum().backward()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("zoneout", [0.0, 0.5])
def test_lstm_cell_state_carried_in_float(device, dtype, path, zoneout):
    """c += 0.001 per step from c = 1 (forget and input gates ~1; zoneout's eval mixture 0.5: half of it): a
    cell state rounded to 16 bits each step would never move (bfloat16's spacing at 1 is 0.008); carried in
    float it reaches 1.3 (1.15)."""
    T = 300
    x = torch.ones(T, 1, 1, device=device, dtype=dtype)
    w_ih = torch.tensor([[20.0], [20.0], [0.001], [0.0]], device=device).to(dtype)  # x @ w_ih^T: the gates
    h0, c0 = torch.zeros(1, 1, device=device, dtype=dtype), torch.ones(1, 1, device=device, dtype=dtype)
    w_hh = torch.zeros(4, 1, device=device, dtype=dtype)
    cn = torch.ops.rnnext.lstm_seq(x, w_ih, h0, c0, w_hh, None, None, None, None, 0.0, True, path, None, zoneout)[2]
    assert abs(cn.item() - (1 + 0.3 * (1 - zoneout))) < 0.01


def chunk_steps(B, GH, elem):
    """cpu/kernels.cpp CpuLauncher::chunk_steps: steps of the input projection held at once on CPU."""
    return max(1, (1 << 20) // (B * GH * elem), -(-512 // B))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 9, 20])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("plain_sum", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_in_chunks_matches_reference(case, T, lengths, reverse, plain_sum, dtype):
    """Sizes where the CPU projects (and backpropagates) a few steps at a time: T within one chunk, a last
    chunk of one step, several chunks; the gradient of y contiguous or not (then copied a chunk at a time).
    float32: the brgemm path, the hidden units split over the threads."""
    G, B = CASES[case][1], 64
    H = -(-700 // G)  # G*H >= 700: 8 steps per chunk (512 rows; fewer would hold 1 MB)
    assert chunk_steps(B, G * H, dtype.itemsize) == 8
    args = make_args(case, T, B, H, "cpu", lengths=lengths, seed=T + G)
    with torch.no_grad():  # weights as torch.nn initialises them (scale 1/sqrt(fan_in)): a recurrence that
        args["w_hh"] /= args["w_hh"].size(1) ** 0.5  # does not amplify rounding errors step after step
    low = {k: v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for k, v in args.items()}
    got = outputs_and_grads(ops.recurrence, low, reverse, plain_sum=plain_sum)
    want = outputs_and_grads(reference.recurrence, args, reverse, plain_sum=plain_sum)
    for a, b in zip(got, want, strict=True):
        # sums over 700 terms: the tolerance scales with each tensor's largest value
        close(a.double(), b, rtol=1e-9 if dtype == torch.float64 else 1e-5)
