"""Argument checks of every public op, forward and backward: each bad argument raises a clear error
before any device work, the fake kernels (torch.compile, FakeTensor) raise the same message, and
non-contiguous arguments give the results of contiguous ones."""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rnnext import ops
from conftest import cpu_and_cuda

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, B, H, P, I = 4, 3, 5, 2, 6


def good_calls(device):
    """{name: (op, [(argument name, value), ...])}: every public op, called right, with lengths."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    rn = torch.ops.rnnext
    lengths = torch.tensor([4, 2, 3], device=device)
    calls = {}

    def mask(parts):  # zoneout keep weights
        return torch.bernoulli(torch.full((T, B, parts * H), 0.5, dtype=torch.float64), generator=g).to(device)

    def add(name, op, **args):
        calls[name] = (op, list(args.items()))
        return op(*args.values())

    # cells
    hy, cy, saved = add("lstm_cell", rn.lstm_cell, xg=t(B, 4 * H), hg=t(B, 4 * H), cx=t(B, H))
    add("lstm_cell_backward", rn.lstm_cell_backward, dhy=t(B, H), dcy=t(B, H), cx=t(B, H), cy=cy, saved=saved)
    hy, saved = add("gru_cell", rn.gru_cell, xg=t(B, 3 * H), hg=t(B, 3 * H), hx=t(B, H))
    add("gru_cell_backward", rn.gru_cell_backward, dhy=t(B, H), hx=t(B, H), saved=saved)
    hy, saved = add("mgru_cell", rn.mgru_cell, xg=t(B, 2 * H), hg=t(B, 2 * H), hx=t(B, H))
    add("mgru_cell_backward", rn.mgru_cell_backward, dhy=t(B, H), hx=t(B, H), saved=saved)
    hy = add("rnn_cell", rn.rnn_cell, xg=t(B, H), hg=t(B, H), nonlinearity="relu")
    add("rnn_cell_backward", rn.rnn_cell_backward, dhy=t(B, H), hy=hy, nonlinearity="relu")
    # sequences
    for proj in (False, True):
        p = P if proj else H
        w_hr = t(P, H) if proj else None
        h0, c0, w_hh, x, w_ih = t(B, p), t(B, H), t(4 * H, p), t(T, B, I), t(4 * H, I)
        y, hn, cn, c_all, saved, r = add(
            "lstm_seq" + ("[proj]" if proj else ""), rn.lstm_seq, x=x, w_ih=w_ih, h0=h0, c0=c0, w_hh=w_hh,
            b_ih=t(4 * H), b_hh=t(4 * H), w_hr=w_hr, lengths=lengths, clip=0.5, save=True, path=0,
            **({} if proj else dict(zoneout_mask=mask(2), zoneout=0.25)))
        add("lstm_seq_backward" + ("[proj]" if proj else ""), rn.lstm_seq_backward, dy=t(T, B, p), dhn=t(B, p),
            dcn=t(B, H), x=x, w_ih=w_ih, y=y, h0=h0, c0=c0, c_all=c_all, saved=saved, r=r, w_hh=w_hh, w_hr=w_hr,
            lengths=lengths, clip=0.5, path=0, **({} if proj else dict(zoneout_mask=mask(2), zoneout=0.25)))
    for name, G in (("gru_seq", 3), ("mgru_seq", 2)):
        h0, w_hh, x, w_ih = t(B, H), t(G * H, H), t(T, B, I), t(G * H, I)
        y, hn, saved = add(name, getattr(rn, name), x=x, w_ih=w_ih, h0=h0, w_hh=w_hh, b_ih=t(G * H),
                           b_hh=t(G * H), lengths=lengths, clip=0.5, save=True, path=0,
                           **(dict(zoneout_mask=mask(1), zoneout=0.25) if G == 3 else {}))
        add(name + "_backward", getattr(rn, name + "_backward"), dy=t(T, B, H), dhn=t(B, H), x=x, w_ih=w_ih, y=y,
            h0=h0, saved=saved, w_hh=w_hh, lengths=lengths, clip=0.5, path=0,
            **(dict(zoneout_mask=mask(1), zoneout=0.25) if G == 3 else {}))
    for name, G, N in (("lnlstm_seq", 4, 5), ("lngru_seq", 3, 6)):
        lstm = name == "lnlstm_seq"
        h0, w_hh, x, w_ih, c0 = t(B, H), t(G * H, H), t(T, B, I), t(G * H, I), t(B, H)
        ln = dict(ln_w=t(N * H), ln_b=t(N * H))
        state = dict(h0=h0, c0=c0) if lstm else dict(h0=h0)
        out = add(name, getattr(rn, name), x=x, w_ih=w_ih, **state, w_hh=w_hh, b_ih=t(G * H), b_hh=t(G * H), **ln,
                  lengths=lengths, eps=1e-5, clip=0.5, save=True, path=0, zoneout_mask=mask(2 if lstm else 1),
                  zoneout=0.25)
        y, hn = out[:2]
        grads = dict(dy=t(T, B, H), dhn=t(B, H)) | (dict(dcn=t(B, H)) if lstm else {})
        saved = dict(h0=h0, c0=c0, c_all=out[3]) if lstm else dict(h0=h0)
        add(name + "_backward", getattr(rn, name + "_backward"), **grads, x=x, w_ih=w_ih, y=y, **saved,
            norm=out[-2], rstd=out[-1], w_hh=w_hh, **ln, lengths=lengths, clip=0.5, path=0,
            zoneout_mask=mask(2 if lstm else 1), zoneout=0.25)
    h0, w_hh, x, w_ih = t(B, H), t(H, H), t(T, B, I), t(H, I)
    y, hn = add("rnn_seq", rn.rnn_seq, x=x, w_ih=w_ih, h0=h0, w_hh=w_hh, b_ih=t(H), b_hh=t(H), lengths=lengths,
                nonlinearity="tanh", clip=0.5, path=0)
    add("rnn_seq_backward", rn.rnn_seq_backward, dy=t(T, B, H), dhn=t(B, H), x=x, w_ih=w_ih, y=y, h0=h0, w_hh=w_hh,
        lengths=lengths, nonlinearity="tanh", clip=0.5, path=0)
    return calls


def unused(arg, value):
    """lstm_seq_backward's r (the cell outputs before projection) is empty and unread without w_hr."""
    return arg == "r" and value.numel() == 0


def bad_values(name, arg, value, device):
    """(what, bad value) pairs for one argument of a good call."""
    if isinstance(value, str):
        return [("unknown nonlinearity", "gelu")]
    if isinstance(value, float):
        return [("negative", -0.5)] + ([("above 1", 1.5)] if arg == "zoneout" else []) + \
            ([("zero", 0.0)] if arg == "eps" else [])
    if isinstance(value, int) and not isinstance(value, bool):
        return [("path 3", 3), ("path -1", -1)]
    if not isinstance(value, torch.Tensor):
        return []
    if unused(arg, value):
        return []
    bigger = list(value.shape)
    bigger[-1] += 1
    bad = [("one more column", torch.zeros(bigger, dtype=value.dtype, device=device)),
           ("one more dimension", value.unsqueeze(0))]
    if arg == "lengths":
        bad += [("int32", value.int()), ("size 1", value[:1])]
    else:
        bad += [("float32", value.float()), ("int32", value.int())]
    if arg in ("saved", "norm") and "seq" in name:
        bad.append(("empty (save=False)", value[:0]))
    return bad


def cases(device):
    calls = good_calls(device)
    return [(name, arg, what) for name, (_, args) in calls.items() for arg, value in args
            for what, _ in bad_values(name, arg, value, device)]


NAMES = sorted(good_calls("cpu")) if ops.LOAD_ERROR is None else []
CASES = cases("cpu") if ops.LOAD_ERROR is None else []


def call_with(device, name, arg, what):
    op, args = good_calls(device)[name]
    args = dict(args)
    args[arg] = dict(bad_values(name, arg, args[arg], device))[what]
    return op, list(args.values())


def error_of(fn):
    with pytest.raises(RuntimeError) as e:
        fn()
    return str(e.value)


def fake_error(op, args, device_of=None):
    """The error of op under FakeTensorMode; device_of(i) moves argument i to another fake device."""
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        if device_of is not None:
            fakes = [device_of(i, a) for i, a in enumerate(fakes)]
        return error_of(lambda: op(*fakes))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name,arg,what", CASES)
def test_bad_argument_raises_same_error_eager_and_fake(device, name, arg, what):
    op, args = call_with(device, name, arg, what)
    eager = error_of(lambda: op(*args))
    assert eager.startswith(name.split("[")[0] + ": ") or eager.startswith("Unknown nonlinearity"), eager
    assert fake_error(op, args) == eager


def test_every_tensor_argument_of_every_op_is_checked():
    """The case list covers each tensor argument of each op (r only with a projection)."""
    covered = {(name, arg) for name, arg, _ in CASES}
    for name, (_, args) in good_calls("cpu").items():
        for arg, value in args:
            if isinstance(value, torch.Tensor) and not unused(arg, value):
                assert (name, arg) in covered, (name, arg)
    assert {name for name, _ in covered} == set(good_calls("cpu"))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_device_raises_in_fake_kernels(name):
    """CUDA calls with one argument left on the CPU (fake tensors: this runs without a GPU)."""
    op, args = good_calls("cpu")[name]
    tensors = [i for i, (arg, v) in enumerate(args) if isinstance(v, torch.Tensor) and not unused(arg, v)]
    for moved in tensors[1:]:
        def device_of(i, a):
            if not isinstance(a, torch.Tensor) or i == moved:
                return a
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")

        msg = fake_error(op, [v for _, v in args], device_of)
        assert "is on cpu" in msg and "is on cuda:0" in msg and args[moved][0] in msg, msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_wrong_device_raises_in_cuda_kernels(name):
    op, args = good_calls("cuda")[name]
    for moved, (arg, value) in enumerate(args):
        if moved == 0 or not isinstance(value, torch.Tensor) or unused(arg, value):
            continue
        bad = [v.cpu() if i == moved and isinstance(v, torch.Tensor) else v for i, (_, v) in enumerate(args)]
        msg = error_of(lambda: op(*bad))
        assert "is on cpu" in msg and "is on cuda:0" in msg and arg in msg, msg


def noncontiguous(t):
    """Same values, every stride doubled: no dimension is contiguous."""
    return torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)[..., 0].copy_(t)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", NAMES)
def test_noncontiguous_arguments(device, name):
    op, args = good_calls(device)[name]
    want = op(*[v for _, v in args])
    for i, (arg, value) in enumerate(args):
        if not isinstance(value, torch.Tensor) or value.numel() < 2:
            continue
        bad = [noncontiguous(v) if j == i else v for j, (_, v) in enumerate(args)]
        assert not bad[i].is_contiguous()
        got = op(*bad)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}({arg} strided): {m}")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_error_with_a_number_does_not_crash(device):
    """The H100's toolchain once built an extension that crashed on any error message with an integer in
    it: tools/smoke.py (also run by tools/gpu_check.sh right after the build) checks in a subprocess."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "smoke.py"), "--device", device],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{device}: ok" in out.stdout
