import os

import pytest
import torch

# The persistent kernels' CPU emulation runs only where a test asks for it (csrc/cpu/emulation.h, emulated::settings):
# every test that asks for the persistent path on CPU means to run it. tests/test_persistent.py unsets it to
# check that users never get it.
os.environ["RNNEXT_TEST_EMULATE_PERSISTENT"] = "1"

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cpu_and_cuda():
    return ("cpu", pytest.param("cuda", marks=CUDA))


def close(actual, expected, rtol):
    """assert_close with the absolute tolerance scaled to the expected tensor's magnitude."""
    expected = expected.to(actual.dtype) if actual.dtype == torch.float64 else expected
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=rtol * max(scale, 1e-3))


def same_error(ours, theirs):
    """Both callables raise, with the same exception type and message."""
    with pytest.raises(Exception) as want:
        theirs()
    with pytest.raises(type(want.value)) as got:
        ours()
    assert str(got.value) == str(want.value)


def tensors_in(values):
    """The tensors among values, those in tuples and lists too (a recurrence's states, a cell's parameters)."""
    for v in values:
        if isinstance(v, (tuple, list)):
            yield from tensors_in(v)
        elif isinstance(v, torch.Tensor):
            yield v


def cast(args, dtype):
    """A recurrence's arguments with every floating tensor (those in tuples too) a new leaf of dtype."""
    def one(v):
        if isinstance(v, (tuple, list)):
            return type(v)(one(u) for u in v)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().to(dtype).requires_grad_()
        return v
    return {k: one(v) for k, v in args.items()}


def gradcheck_recurrence(fn, args, **kw):
    """torch.autograd.gradcheck of fn(**args, **kw) -> (y, states) w.r.t. every tensor of args that requires grad."""
    leaves = [v for v in tensors_in(args.values()) if v.requires_grad]

    def rebuild(values, it):
        if isinstance(values, (tuple, list)):
            return type(values)(rebuild(v, it) for v in values)
        return next(it) if isinstance(values, torch.Tensor) and values.requires_grad else values

    def f(*tensors):
        it = iter(tensors)
        y, states = fn(**{k: rebuild(v, it) for k, v in args.items()}, **kw)
        return (y, *states)

    return torch.autograd.gradcheck(f, leaves)


def outputs_and_grads(fn, args, plain_sum=False, **kw):
    """fn(**args, **kw) -> (y, states), a recurrence: its outputs (y, then every final state) and the gradients
    of a random projection of them (plain_sum: of their sum, whose gradient is expanded, non-contiguous) w.r.t.
    every tensor of args that requires grad (the states and the cell's parameters included)."""
    y, states = fn(**args, **kw)
    outs = [y, *states]
    g = torch.Generator().manual_seed(1)
    loss = sum((o if plain_sum else o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
               for o in outs)
    leaves = [v for v in tensors_in(args.values()) if v.requires_grad]
    return outs + list(torch.autograd.grad(loss, leaves))


@pytest.fixture
def no_tf32():
    """TF32 off in cuBLAS and cuDNN for the test, restored after: float32 comparisons on CUDA would otherwise
    compare products of 10-bit mantissas (cuDNN's RNNs use TF32 by default)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rms(t):
    return t.double().pow(2).mean().sqrt().item()


def assert_low_precision_rule(got, base, exact, dtype):
    """DESIGN.md's 16-bit rule, tensor by tensor: the root-mean-square error of got (the fused result at dtype)
    vs exact (float64) is at most twice base's (torch.nn's, or the reference's, at dtype), plus 1e-4 of exact's
    RMS: a floor for tensors that both sides get nearly exact."""
    assert len(got) == len(base) == len(exact)
    for k, (g, b, e) in enumerate(zip(got, base, exact)):
        assert g.dtype == dtype and g.shape == e.shape, (k, g.dtype, g.shape, e.shape)
        err, base_err = rms(g.double() - e), rms(b.double() - e)
        assert err <= 2 * base_err + 1e-4 * rms(e), (k, err, base_err)


class RecordedMasks:
    """Stands in for rnnext.functional.keep_mask (monkeypatch it): seeded Bernoulli draws of the size asked, on
    the CPU in float64 whatever the dtype and device asked for (so runs at different dtypes get the same masks),
    recorded in order; ``restart()`` replays the same sequence of draws."""

    def __init__(self, seed):
        self.seed = seed
        self.restart()

    def restart(self):
        self.g = torch.Generator().manual_seed(self.seed)
        self.drawn = []

    def __call__(self, p, size, like):
        m = torch.bernoulli(torch.full(tuple(size), p, dtype=torch.float64), generator=self.g)
        self.drawn.append(m)
        return m.to(like)
