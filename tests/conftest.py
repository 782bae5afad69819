import os

import pytest
import torch

# The persistent kernels' CPU emulation runs only where a test asks for it (csrc/cpu/kernels.cpp, emulated::mode):
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


def outputs_and_grads(fn, args, plain_sum=False, **kw):
    """fn(**args, **kw) -> (y, h, c or None), a recurrence: its outputs and the gradients of a random
    projection of them (plain_sum: of their sum, whose gradient is expanded, non-contiguous) w.r.t. every
    tensor of args that requires grad."""
    y, h, c = fn(**args, **kw)
    outs = [y, h] + ([c] if c is not None else [])
    g = torch.Generator().manual_seed(1)
    loss = sum((o if plain_sum else o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
               for o in outs)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return outs + list(torch.autograd.grad(loss, leaves))
