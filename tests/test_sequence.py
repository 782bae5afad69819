"""The fused sequence ops (one layer-direction) vs rnnext.reference.recurrence, on both paths (1: per step;
2: persistent where it has a plan, which float64 never has: here path 2 tests the fallback to per step, id
2-fallback; the persistent kernels themselves: tests/test_persistent.py); op registration checks."""
import functools

import pytest
import torch

from rnnext import cells, ops, reference
import conftest
from conftest import close, cpu_and_cuda

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")

# name: (cell, gates, proj_size): every element cell of rnnext.cells (a new one is tested here without an edit;
# the row cells, layer norm: tests/test_layernorm.py), and the LSTM with a projection
CASES = {c.name: (c.name, c.gates, 0) for c in cells.CELLS.values() if not c.rows}
CASES["lstm_proj"] = ("lstm", 4, 3)


def make_args(case, T, B, H, device, dtype=torch.float64, bias=True, lengths=False, seed=0):
    """Leaf tensors for recurrence(cell, x, w_ih, w_hh, states, b_ih, b_hh, w_hr=, lengths=); input size 3."""
    cell, G, P = CASES[case]
    P = P or H
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(device, dtype).requires_grad_()  # noqa
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        lens = lens.to(device)
    x, w_ih = t(T, B, 3), t(G * H, 3)
    states = (t(B, P), *[t(B, H) for _ in range(cells.get(cell).others)])
    if cell == "slstm":  # a normaliser n0 > 0 (n0 = 0, where the function jumps: tests/test_slstm.py)
        states = (*states[:2], (states[2].detach().abs() + 0.5).requires_grad_(), states[3])
    w_hh = t(G * H, P)
    return dict(cell=cell, x=x, w_ih=w_ih, w_hh=w_hh, states=states, b_ih=t(G * H) if bias else None,
                b_hh=t(G * H) if bias else None, w_hr=t(P, H) if CASES[case][2] else None, lengths=lens)


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
    y, (h, *_) = fused(path)(**args)
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
    a = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    h0, *rest = [s.detach() for s in a["states"]]
    s0 = torch.stack(rest) if rest else h0.new_empty(0, h0.size(0), a["w_ih"].size(0) // CASES[case][1])
    op = getattr(torch.ops.rnnext, a["cell"] + "_seq")
    return op, (a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], h0, s0, None, None, a["w_hr"], a["lengths"], None,
                0.0, clip, 1e-5, save, path)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_opcheck(device, case, lengths, path):
    args = make_args(case, 4, 3, 5, device, lengths=lengths, seed=5)
    op, inputs = op_call(case, args, path)
    torch.library.opcheck(op, inputs)


def backward_call(case, args, path, mask=(True,) * 10, seed=0):
    """The backward op and its positional arguments, after the forward: random output gradients."""
    op, inputs = op_call(case, args, path)
    with torch.no_grad():
        y, hn, sn, s_all, saved, stats, r = op(*inputs)
    x, w_ih, w_hh, b_ih, b_hh, h0, s0, param0, param1, w_hr, lengths, zmask, zoneout, clip = inputs[:14]
    g = torch.Generator().manual_seed(seed)
    d = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)  # noqa: E731
    return getattr(torch.ops.rnnext, args["cell"] + "_seq_backward"), (
        d(y), d(hn), d(sn), x, w_ih, w_hh, h0, s0, param0, param1, w_hr, lengths, zmask, zoneout, clip, y, s_all, saved,
        stats, r, path, list(mask))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_opcheck_backward(device, case, lengths, path):
    args = make_args(case, 4, 3, 5, device, lengths=lengths, seed=6)
    op, inputs = backward_call(case, args, path)
    torch.library.opcheck(op, inputs)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
def test_output_mask_computes_what_is_asked_only(device, case, lengths):
    """Each gradient of the backward op alone (output_mask one-hot) equals the all-gradients call's; the others
    come back empty."""
    args = make_args(case, 5, 3, 4, device, lengths=lengths, seed=8)
    op, full_call = backward_call(case, args, 1, seed=9)
    full = op(*full_call)
    names = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "s0", "param0", "param1", "w_hr")
    for i in range(10):
        mask = [j == i for j in range(10)]
        _, call = backward_call(case, args, 1, mask, seed=9)
        got = op(*call)
        for j, (g, f) in enumerate(zip(got, full)):
            if names[j].startswith("param"):  # these cells have none
                assert g.numel() == 0 and f.numel() == 0
            elif j == i and (names[i] != "w_hr" or args["w_hr"] is not None):
                assert torch.equal(g, f), names[i]
            else:
                assert g.numel() == 0, (names[i], names[j])


@pytest.mark.parametrize("case", ["lstm", "gru", "rnn_tanh"])
def test_frozen_first_layer_costs_no_input_or_weight_gradient(case):
    """Through autograd, a first layer on raw features with frozen input weights and no biases: autograd asks
    the backward op for the recurrent weight's and the states' gradients only (output_mask; the op's other
    outputs stay empty and cost no GEMM: test_output_mask_computes_what_is_asked_only), equal to the
    reference's."""
    args = make_args(case, 6, 3, 5, "cpu", seed=10)
    full = outputs_and_grads(ops.recurrence, args, False)
    frozen = dict(args, x=args["x"].detach(), w_ih=args["w_ih"].detach(), b_ih=None, b_hh=None)
    frozen_ref = dict(args, x=frozen["x"], w_ih=frozen["w_ih"], b_ih=None, b_hh=None)
    got = outputs_and_grads(ops.recurrence, frozen, False)
    want = outputs_and_grads(reference.recurrence, frozen_ref, False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(got) < len(full)


def test_unknown_cell_fails_by_name():
    args = make_args("gru", 2, 2, 3, "cpu")
    for impl in (ops, reference):
        with pytest.raises(ValueError, match="unknown cell 'grux'"):
            impl.recurrence(**dict(args, cell="grux"))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(device, case, lengths, path):
    args = make_args(case, 3, 2, 2, device, lengths=lengths, seed=7)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    states = args["states"]

    def f(*tensors):
        kw = dict(args, **dict(zip(names, tensors)), states=tensors[len(names):])
        y, final = fused(path)(**kw)
        return (y, *final)

    assert torch.autograd.gradcheck(f, [args[k] for k in names] + list(states))


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
    n_out = 1 + len(args["states"])
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(got[n_out:], unclipped[n_out:]))  # clipping acted
    for a, b in zip(got[:n_out], unclipped[:n_out]):
        assert torch.equal(a, b)  # forward untouched


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", ["lstm", "lstm_proj", "gru", "minimal_gru"])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_save_false_skips_saving_only(device, case, lengths, path):
    """save=False (what a no_grad forward uses): same outputs, nothing saved; backward refuses."""
    args = make_args(case, 5, 3, 4, device, lengths=lengths, seed=12)
    op, full_call = op_call(case, args, path, 0.0, True)
    op, light_call = op_call(case, args, path, 0.0, False)
    full = op(*full_call)
    light = op(*light_call)
    for a, b in zip(full[:3], light[:3]):  # y, h_n, s_n
        assert torch.equal(a, b)
    assert all(t.size(0) == 0 for t in light[3:6])  # s_all, saved, stats
    torch.library.opcheck(op, light_call)
    leaf = light_call[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="without saving for backward"):
        op(leaf, *light_call[1:])[0].sum().backward()


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
    sn = torch.ops.rnnext.lstm_seq(x, w_ih, w_hh, None, None, h0, c0[None], None, None, None, None, None, zoneout, 0.0,
                                   1e-5, True, path)[2]
    assert abs(sn[0].item() - (1 + 0.3 * (1 - zoneout))) < 0.01


def chunk_steps(B, GH, elem):
    """cpu/launcher.h CpuLauncher::chunk_steps: steps of the input projection held at once on CPU."""
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
    low["states"] = tuple(v.detach().to(dtype).requires_grad_() for v in args["states"])
    got = outputs_and_grads(ops.recurrence, low, reverse, plain_sum=plain_sum)
    want = outputs_and_grads(reference.recurrence, args, reverse, plain_sum=plain_sum)
    for a, b in zip(got, want, strict=True):
        # sums over 700 terms: the tolerance scales with each tensor's largest value
        close(a.double(), b, rtol=1e-9 if dtype == torch.float64 else 1e-5)
