"""torch.ops.rnnext.mm, the input projection's GEMM (CPU: tiled oneDNN brgemm for float), vs torch.mm."""
import pytest
import torch

from rnnext import ops
from conftest import cpu_and_cuda

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 5, 7), (65, 513, 257), (200, 1030, 40), (7, 2, 600)])
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_torch(device, dtype, M, K, N, transposed):
    """Sizes across the CPU tiles (64 rows, 256 columns, K blocks of 512); operands as transposed views."""
    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randn(M, K, generator=g, dtype=torch.float64)
    b = torch.randn(K, N, generator=g, dtype=torch.float64)
    want = a @ b
    a, b = a.to(device, dtype), b.to(device, dtype)
    if transposed:
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    got = torch.ops.rnnext.mm(a, b)
    assert got.dtype == dtype and got.is_contiguous()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_gradcheck_and_opcheck(device):
    a = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.rnnext.mm, (a, b))
    assert torch.autograd.gradgradcheck(torch.ops.rnnext.mm, (a, b))
    torch.library.opcheck(torch.ops.rnnext.mm, (a.detach(), b.detach()))


def test_project_is_linear_without_bias():
    x, w = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(ops.project(x, w), torch.nn.functional.linear(x, w))
    torch.testing.assert_close(ops.project(x.transpose(0, 1), w), torch.nn.functional.linear(x.transpose(0, 1), w))
