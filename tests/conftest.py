import pytest
import torch

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
