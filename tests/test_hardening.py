"""rnnext where users take it: random configurations, bad and odd input, long sequences, threads,
serialization, distributed training."""
import contextlib
import copy
import io
import os
import pickle
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnext
from conftest import close, cpu_and_cuda, same_error

MODULES = {"lstm": (rnnext.LSTM, nn.LSTM), "gru": (rnnext.GRU, nn.GRU), "rnn_tanh": (rnnext.RNN, nn.RNN),
           "rnn_relu": (rnnext.RNN, nn.RNN)}


def make(kind, *args, **kwargs):
    ours_cls, theirs_cls = MODULES[kind]
    if kind.startswith("rnn"):
        kwargs["nonlinearity"] = kind.split("_")[1]
    ours = ours_cls(*args, **kwargs)
    theirs = theirs_cls(*args, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def outputs_and_grads(model, x, backend="auto"):
    data = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
    with rnnext.use_backend(backend) if hasattr(model, "_run") else contextlib.nullcontext():
        out, hidden = model(x)
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    outs = [out] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    g = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    return outs + list(torch.autograd.grad(loss, [data] + list(model.parameters())))


@settings(max_examples=220, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(MODULES)), num_layers=st.integers(1, 3), bidirectional=st.booleans(),
       batch_first=st.booleans(), bias=st.booleans(), proj=st.integers(0, 3), T=st.integers(1, 6),
       B=st.integers(1, 4), I=st.integers(1, 5), H=st.integers(1, 6), packed=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_fuzz_against_torch_and_reference(kind, num_layers, bidirectional, batch_first, bias, proj, T, B, I, H, packed,
                                          dtype, seed):
    torch.manual_seed(seed)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if kind == "lstm" and proj and proj < H:
        kw["proj_size"] = proj
    ours, theirs = make(kind, I, H, **kw)
    ours, theirs = ours.to(dtype), theirs.double()
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        x64 = pack_padded_sequence(x.requires_grad_(), lengths, batch_first=batch_first, enforce_sorted=False)
        x_ours = pack_padded_sequence(x.detach().to(dtype).requires_grad_(), lengths, batch_first=batch_first,
                                      enforce_sorted=False)
    else:
        x64, x_ours = x.requires_grad_(), x.detach().to(dtype).requires_grad_()
    want = outputs_and_grads(theirs, x64)
    # per tensor: relative, the absolute part scaled to that tensor's own largest value (conftest.close)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for backend in ("fused", "reference") if rnnext.ops.LOAD_ERROR is None else ("reference",):
        got = outputs_and_grads(ours, x_ours, backend)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.shape == b.shape
            close(a.double(), b, tol)


# PackedSequences built by hand: pack_padded_sequence refuses lengths that are 0, larger than T or (with
# enforce_sorted=True) unsorted itself, in ATen, before any module sees them; these reach the modules.
# (More data rows than batch_sizes count is left out: torch.nn's reverse direction reads the extra rows.)
ODD_PACKED = {"unsorted": None,  # pack_padded_sequence(enforce_sorted=False) of lengths [2, 5, 1]
              "trailing_zero_batch_size": (3, [3, 0])}
BAD_PACKED = {"increasing_batch_sizes": (6, [1, 2, 3]), "fewer_rows_than_batch_sizes": (5, [3, 2, 1])}


def packed(case, I=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    if case == "unsorted":
        x = torch.randn(5, 3, I, generator=g, dtype=dtype)
        return pack_padded_sequence(x.requires_grad_(), [2, 5, 1], enforce_sorted=False)
    rows, batch_sizes = {**ODD_PACKED, **BAD_PACKED}[case]
    return PackedSequence(torch.randn(rows, I, generator=g, dtype=dtype).requires_grad_(), torch.tensor(batch_sizes))


@pytest.mark.parametrize("case", sorted(ODD_PACKED))
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_odd_packed_input_like_torch(kind, case):
    """Unusual but valid PackedSequences: outputs, final states and the gradients w.r.t. the packed data and
    every parameter equal torch.nn's (float64, 1e-10 per tensor)."""
    ours, theirs = make(kind, 3, 4, num_layers=2, bidirectional=True)
    ours, theirs = ours.double(), theirs.double()
    x = packed(case)
    got, want = outputs_and_grads(ours, x), outputs_and_grads(theirs, x)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        close(a, b, 1e-10)


@pytest.mark.parametrize("case", sorted(BAD_PACKED))
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bad_packed_input_raises_like_torch(kind, case):
    """torch.nn raises a RuntimeError (from wherever its loop trips: the messages are incidental); so must rnnext."""
    ours, theirs = make(kind, 3, 4)
    with pytest.raises(RuntimeError):
        theirs(packed(case, dtype=torch.float32))
    with pytest.raises(RuntimeError):
        ours(packed(case, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_empty_packed_input_like_torch(kind):
    """batch_sizes [0], no rows: torch.nn returns empty outputs and states [L*D, 0, H]; so must rnnext."""
    ours, theirs = make(kind, 3, 4)
    x = PackedSequence(torch.randn(0, 3), torch.tensor([0]))
    (a, ha), (b, hb) = ours(x), theirs(x)
    assert a.data.shape == b.data.shape
    for h, w in zip(ha if kind == "lstm" else (ha,), hb if kind == "lstm" else (hb,), strict=True):
        assert h.shape == w.shape


_CRASH_SCRIPT = """
import torch, rnnext
from torch.nn.utils.rnn import PackedSequence
torch.manual_seed(0)
for rows, batch_sizes in ((3, [3, -1]), (4, [2, 0, 2])):
    for model in (torch.nn.LSTM(3, 4), rnnext.LSTM(3, 4)):
        try:
            model(PackedSequence(torch.randn(rows, 3), torch.tensor(batch_sizes)))
        except RuntimeError:
            print("raised")
"""


def test_bad_batch_sizes_raise_instead_of_crashing():
    """batch_sizes [3, -1] and [2, 0, 2]: torch.nn.LSTM raises a RuntimeError for each; rnnext.LSTM must too,
    not abort the process (run in a subprocess: today it does abort)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["raised"] * 4


def _lstm_args(T=4, B=3, I=2, H=3):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return dict(cell="lstm", x=t(T, B, I), w_ih=t(4 * H, I), w_hh=t(4 * H, H), states=(t(B, H), t(B, H)))


@pytest.mark.parametrize("impl", ["reference", pytest.param("ops", marks=pytest.mark.skipif(
    rnnext.ops.LOAD_ERROR is not None, reason="extension not built"))])
@pytest.mark.parametrize("lengths", [[6, 2, 3], [4, 0, 2], [4, -1, 2]], ids=["past_T", "zero", "negative"])
@pytest.mark.parametrize("reverse", [False, True])
def test_recurrence_refuses_lengths_out_of_range(impl, lengths, reverse):
    """Padded input with lengths at op level (T = 4): lengths outside [1, T] are a RuntimeError naming lengths,
    as torch.nn's pack_padded_sequence refuses them (0 included)."""
    fn = getattr(rnnext, impl).recurrence
    with pytest.raises(RuntimeError, match="lengths"):
        fn(**_lstm_args(), lengths=torch.tensor(lengths), reverse=reverse)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_device_mismatch_like_torch(kind):
    ours, theirs = make(kind, 3, 4)
    ours, theirs = ours.cuda(), theirs.cuda()
    x = torch.randn(5, 2, 3)
    same_error(lambda: ours(x), lambda: theirs(x))
    D = 1
    hx = torch.zeros(D, 2, 4)
    hx = (hx, hx) if kind == "lstm" else hx
    same_error(lambda: ours(x.cuda(), hx), lambda: theirs(x.cuda(), hx))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_nan_and_inf_propagate_like_torch(device, kind):
    ours, theirs = make(kind, 3, 4, num_layers=2)
    ours, theirs = ours.to(device, torch.float64), theirs.to(device, torch.float64)
    x = torch.randn(6, 3, 3, device=device, dtype=torch.float64)
    x[2, 0, 1] = float("nan")
    x[4, 2, 0] = float("inf")
    got, want = ours(x)[0], theirs(x)[0]
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_long_sequence_memory_linear_in_T(kind):
    """T = 10000 forward+backward runs (a loop, no recursion), and what autograd saves grows linearly."""
    ours, _ = make(kind, 4, 8)

    def saved_bytes(T):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        x = torch.randn(T, 2, 4, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = ours(x)
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
        return total[0]

    small, large = saved_bytes(1000), saved_bytes(10000)
    assert 9.5 < large / small < 10.5


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_threads_get_sequential_results(kind):
    ours, _ = make(kind, 5, 6, num_layers=2, bidirectional=True)
    xs = [torch.randn(7, 3, 5, requires_grad=True) for _ in range(4)]

    def run(x):
        y, _ = ours(x)
        return [y.detach()] + list(torch.autograd.grad(y.square().sum(), [x] + list(ours.parameters())))

    want = [run(x) for x in xs]
    got = [None] * 4

    def worker(i):
        got[i] = run(xs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        for a, b in zip(g, w, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_serialization_and_conversions(kind):
    ours, theirs = make(kind, 3, 4, num_layers=2, bidirectional=True, **({"proj_size": 2} if kind == "lstm" else {}))
    x = torch.randn(5, 2, 3)
    want = ours(x)[0]
    # state_dict both ways
    fresh_ours, fresh_theirs = make(kind, 3, 4, num_layers=2, bidirectional=True,
                                    **({"proj_size": 2} if kind == "lstm" else {}))
    fresh_theirs.load_state_dict(ours.state_dict())
    fresh_ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh_theirs(x)[0], want)
    torch.testing.assert_close(fresh_ours(x)[0], want)
    # pickling, torch.save, deepcopy
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(clone) is type(ours)
        torch.testing.assert_close(clone(x)[0], want)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x)[0], want)
    # dtype conversions keep working (flat weights follow)
    assert ours.double()(x.double())[0].dtype == torch.float64
    assert ours.to(torch.float32)(x)[0].dtype == torch.float32


def test_public_api_documented():
    import inspect

    import rnnext.functional as F

    public = [getattr(rnnext, n) for n in rnnext.__all__ if not inspect.ismodule(getattr(rnnext, n))]
    public += [F.lstm, F.gru, F.rnn, F.lstm_cell, F.gru_cell, F.rnn_cell, F.set_backend, F.use_backend,
               rnnext.reference.recurrence, rnnext.ops.recurrence]
    public += [getattr(c, "forward") for c in (rnnext.LSTM, rnnext.GRU, rnnext.RNN, rnnext.LSTMCell, rnnext.GRUCell,
                                               rnnext.RNNCell)]
    for obj in public:
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, obj


def _ddp_worker(rank, world, init_file, kind, steps, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two processes on two cores
    torch.manual_seed(0)
    rnn, _ = make(kind, 3, 5)
    model = torch.nn.parallel.DistributedDataParallel(rnn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 4 * world, 3, generator=g)[:, rank * 4:(rank + 1) * 4]
        y, _ = model(x)
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.detach() for k, v in rnn.state_dict().items()}, result_file)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    # No interpreter shutdown: gloo's worker thread may free its last work object (it holds a Python object)
    # while Python finalizes, and that thread's exit aborts the process (torch 2.14, about 1 run in 10; core:
    # ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~ThreadLocalState -> decref -> PyThread_exit_thread).
    os._exit(0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_ddp_two_processes_match_one(kind, tmp_path):
    import torch.multiprocessing as mp

    steps, world = 3, 2
    result = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), kind, steps, result), nprocs=world, join=True)
    torch.manual_seed(0)
    single, _ = make(kind, 3, 5)
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 4 * world, 3, generator=g)
        y, _ = single(x)
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
    got = torch.load(result)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
