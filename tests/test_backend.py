"""Backend selection: traced by torch.compile on every device, per thread, recompiled when switched."""
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rnnext
from rnnext import functional, ops, reference


def fused_or_not(x):
    return x * 2 if functional.backend_for(x) is ops else x * 3


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backend_choice_compiles_fullgraph_on_every_device(device):
    """The choice is plain Python on the tensor's device and dtype (what kernels exist is decided at
    import): Dynamo traces it for a CUDA tensor too. A fake CUDA tensor needs no GPU."""
    compiled = torch.compile(fused_or_not, fullgraph=True, backend="eager")
    with FakeTensorMode():
        x = torch.empty(3, device=device)
        assert compiled(x).device.type == device


def test_compiled_choice_follows_the_switch():
    torch._dynamo.reset()
    compiled = torch.compile(fused_or_not, fullgraph=True, backend="eager")
    x = torch.ones(2)
    want_auto = 2.0 if ops.available(x) else 3.0
    assert compiled(x)[0].item() == want_auto
    with rnnext.use_backend("reference"):
        assert compiled(x)[0].item() == 3.0
    assert compiled(x)[0].item() == want_auto


def test_available_is_decided_at_import():
    assert ops.available(torch.empty(1)) == (ops.LOAD_ERROR is None)
    assert not ops.available(torch.empty(1, dtype=torch.complex64))
    assert not ops.available(torch.empty(1, device="meta"))
    assert ("cuda" in ops.DEVICES) == (ops.LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "rnnext::lstm_cell", "CUDA"))


def test_switch_is_per_thread():
    """One thread inside use_backend("reference") does not change what another thread runs."""
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def switched():
        with rnnext.use_backend("reference"):
            seen["switched"] = functional.backend_for(torch.empty(1))
            inside.set()
            done.wait(10)

    def other():
        inside.wait(10)
        seen["other"] = functional.backend_for(torch.empty(1))
        rnnext.set_backend("reference")  # set_backend too: this thread only
        done.set()

    threads = [threading.Thread(target=switched), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["switched"] is reference
    assert seen["other"] is (ops if ops.LOAD_ERROR is None else reference)
    assert functional.backend_for(torch.empty(1)) is seen["other"]  # this thread: untouched


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        rnnext.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        with rnnext.use_backend("cudnn"):
            pass


def test_unvalidated_cuda_kernels_are_opt_in():
    """The layer-normalised cells' and head-wise layers' CUDA kernels never ran on a GPU: "auto" runs the reference
    on CUDA, "fused" opts in; on CPU both run fused."""
    with FakeTensorMode():
        x = torch.empty(3, device="cuda")
        assert functional._impl("LNLSTM", x, "auto") is reference
        assert functional._impl("LSTM", x, "auto") is (ops if "cuda" in ops.DEVICES else reference)
        assert functional._impl("LSTM", x, "auto", heads=True) is reference
    cpu = torch.empty(3)
    assert functional._impl("GRU", cpu, "auto", heads=True) is (ops if ops.LOAD_ERROR is None else reference)
    assert functional._impl("LNGRU", cpu, "auto") is (ops if ops.LOAD_ERROR is None else reference)
    if "cuda" in ops.DEVICES:
        with FakeTensorMode():
            assert functional._impl("LNGRU", torch.empty(3, device="cuda"), "fused") is ops
