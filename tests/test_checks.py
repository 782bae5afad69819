"""Argument checks of every public op, forward and backward: each bad argument raises a clear error
before any device work, the fake kernels (torch.compile, FakeTensor) raise the same message, and
non-contiguous arguments give the results of contiguous ones."""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rnnext import cells, ops
from conftest import cpu_and_cuda

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, B, H, P, I = 4, 3, 5, 2, 6


def cell_of(name):
    """The cell an op name belongs to: lstm_seq_backward[proj] -> lstm."""
    base = name.split("[")[0]
    for suffix in ("_seq_backward", "_seq", "_cell_backward", "_cell"):
        if base.endswith(suffix):
            return cells.get(base[:-len(suffix)])
    raise ValueError(name)


def good_calls(device):
    """{name: (op, [(argument name, value), ...])}: every public op of every cell, called right, with lengths,
    arguments in the schema's order."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    rn = torch.ops.rnnext
    lengths = torch.tensor([4, 2, 3], device=device)
    calls = {}

    def add(name, op, **args):
        calls[name] = (op, list(args.items()))
        return op(*args.values())

    for cell in cells.CELLS.values():
        G, Z1 = cell.gates, cell.others
        if not cell.rows:
            op = getattr(rn, cell.name + "_cell")
            h_new, s_new, saved = add(cell.name + "_cell", op, xg=t(B, G * H), hg=t(B, G * H), h=t(B, H), s=t(Z1, B, H))
            add(cell.name + "_cell_backward", getattr(rn, cell.name + "_cell_backward"), dh_new=t(B, H),
                ds_new=t(Z1, B, H), h=t(B, H), s=t(Z1, B, H), h_new=h_new, saved=saved)
        for proj in (False, True) if cell.proj else (False,):
            p = P if proj else H
            sfx = "[proj]" if proj else ""
            zoned = cell.zoned and not proj
            mask = torch.bernoulli(torch.full((T, B, cell.zoned * H), 0.5, dtype=torch.float64), generator=g).to(device)
            zone = dict(zoneout_mask=mask if zoned else None, zoneout=0.25 if zoned else 0.0)
            x, w_ih, w_hh, h0, s0 = t(T, B, I), t(G * H, I), t(G * H, p), t(B, p), t(Z1, B, H)
            params = [t(cell.param_units * H) if cell.params else None for _ in range(2)]
            w_hr = t(P, H) if proj else None
            y, hn, sn, s_all, saved, stats, r = add(
                cell.name + "_seq" + sfx, getattr(rn, cell.name + "_seq"), x=x, w_ih=w_ih, w_hh=w_hh, b_ih=t(G * H),
                b_hh=t(G * H), h0=h0, s0=s0, param0=params[0], param1=params[1], w_hr=w_hr, lengths=lengths, **zone,
                clip=0.5, eps=1e-5, save=True, path=0)
            add(cell.name + "_seq_backward" + sfx, getattr(rn, cell.name + "_seq_backward"), dy=t(T, B, p),
                dh_n=t(B, p), ds_n=t(Z1, B, H), x=x, w_ih=w_ih, w_hh=w_hh, h0=h0, s0=s0, param0=params[0],
                param1=params[1], w_hr=w_hr, lengths=lengths, **zone, clip=0.5, y=y, s_all=s_all, saved=saved,
                stats=stats, r=r, path=0, output_mask=[True] * 10)
    return calls


def bad_values(name, arg, value, device):
    """(what, bad value) pairs for one argument of a good call."""
    cell = cell_of(name)
    if isinstance(value, float):
        return [("negative", -0.5)] + ([("above 1", 1.5)] if arg == "zoneout" else []) + \
            ([("zero", 0.0)] if arg == "eps" else []) if arg != "eps" or cell.params else []
    if isinstance(value, int) and not isinstance(value, bool):
        return [("path 3", 3), ("path -1", -1)]
    if arg in ("param0", "param1") and value is None:  # cells without parameters: one given is one too many
        return [("given", torch.zeros(3, dtype=torch.float64, device=device))]
    if not isinstance(value, torch.Tensor):
        return []
    bigger = list(value.shape)
    bigger[-1] += 1
    bad = [("one more column", torch.zeros(bigger, dtype=value.dtype, device=device)),
           ("one more dimension", value.unsqueeze(0))]
    if arg == "lengths":
        bad += [("int32", value.int()), ("size 1", value[:1])]
    else:
        bad += [("float32", value.float()), ("int32", value.int())]
    if arg == "saved" and "seq" in name:
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
    assert eager.startswith(name.split("[")[0] + ": "), eager
    assert fake_error(op, args) == eager


def test_every_tensor_argument_of_every_op_is_checked():
    """The case list covers each tensor argument of each op (r only with a projection)."""
    covered = {(name, arg) for name, arg, _ in CASES}
    for name, (_, args) in good_calls("cpu").items():
        for arg, value in args:
            if isinstance(value, torch.Tensor) or arg.startswith("param"):
                assert (name, arg) in covered, (name, arg)
    assert {name for name, _ in covered} == set(good_calls("cpu"))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_device_raises_in_fake_kernels(name):
    """CUDA calls with one argument left on the CPU (fake tensors: this runs without a GPU)."""
    op, args = good_calls("cpu")[name]
    tensors = [i for i, (arg, v) in enumerate(args) if isinstance(v, torch.Tensor)]
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
        if moved == 0 or not isinstance(value, torch.Tensor):
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
