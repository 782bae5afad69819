"""The persistent path: its planner (plain C++, persistent/plan.h) and where it runs or falls back.
Its results are tested with the other paths' tests (test_sequence.py, test_layers.py: path 2 and the
"persistent" backend), on CUDA by the kernels, on CPU by their emulation."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from rnnext import functional, ops, reference
from conftest import cpu_and_cuda

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")

# (sms, smem_per_block, threads, min_rows, align_units)
H100 = (132, 232448, 256, 32, True)  # cuda/persistent.cuh device_capacity() on an H100
EMULATED = (8, 48 * 1024, 1, 1, False)  # cpu/kernels.cpp: emulated::kDevice
FIELDS = ("fits", "ctas", "units", "Bp", "Np", "Kp", "kc", "smem")
DTYPES = {"bf16": (2, 4, True), "fp16": (2, 4, True), "fp32": (4, 4, False), "fp64": (8, 8, False)}


def plan(backward, G, B, H, dtype, capacity=H100):
    elem, acc, mma = DTYPES[dtype]
    return dict(zip(FIELDS, torch.ops.rnnext.persistent_plan(backward, G, B, H, elem, acc, mma, *capacity)))


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("G", [1, 2, 3, 4])
@pytest.mark.parametrize("B", [1, 5, 16, 64, 256])
@pytest.mark.parametrize("H", [1, 7, 100, 256, 768, 1000, 2048])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_plan_is_consistent(backward, G, B, H, dtype):
    p = plan(backward, G, B, H, dtype)
    assert 1 <= p["ctas"] and (p["ctas"] - 1) * p["units"] < H <= p["ctas"] * p["units"]  # every unit, no idle CTA
    rows = p["units"] * (1 if backward else G)
    K = G * H if backward else H
    tile = 16 if DTYPES[dtype][2] else 1
    assert p["Bp"] >= B and p["Np"] >= rows and p["Kp"] >= K
    assert p["Bp"] % tile == 0 and p["Np"] % tile == 0 and p["Kp"] % tile == 0 and p["kc"] % tile == 0
    if p["fits"]:
        assert p["ctas"] <= H100[0] and p["smem"] <= H100[1]
        assert p["kc"] >= min(16, p["Kp"]) and p["kc"] <= p["Kp"]
    # The weights alone: more than the whole chip's shared memory never fits.
    weights = G * H * H * DTYPES[dtype][0]
    if weights > H100[0] * H100[1]:
        assert not p["fits"]


@pytest.mark.parametrize("G,B,H,dtype", [(4, 16, 768, "bf16"), (4, 16, 768, "fp16"), (4, 1, 256, "bf16"),
                                         (4, 1, 256, "fp32"), (4, 64, 512, "bf16"), (3, 16, 768, "bf16"),
                                         (1, 1, 256, "fp32"), (4, 256, 1024, "bf16")])
def test_issue_configs_fit_an_h100(G, B, H, dtype):
    """The configurations of the performance targets (forward and backward) are planned on chip."""
    for backward in (False, True):
        assert plan(backward, G, B, H, dtype)["fits"], (backward, G, B, H, dtype)


def test_plan_splits_evenly_and_aligns_tiles():
    p = plan(False, 4, 16, 768, "bf16")
    assert p["units"] * 4 % 16 == 0  # each CTA's gate rows are whole 16-row tiles
    assert p["ctas"] == 768 // p["units"]
    b = plan(True, 4, 16, 768, "bf16")
    assert b["units"] % 16 == 0


def persistent_ran(case_G, T, B, H, dtype, path):
    """(ran forward persistent, ran backward persistent, max error vs the reference) of one LSTM/GRU/RNN."""
    mode = {4: "LSTM", 3: "GRU", 1: "RNN"}[case_G]
    g = torch.Generator().manual_seed(H)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    args = dict(x=t(T, B, 3), w_ih=t(case_G * H, 3), h0=t(B, H), c0=t(B, H) if mode == "LSTM" else None,
                w_hh=(torch.randn(case_G * H, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
                .requires_grad_(), b_ih=t(case_G * H), b_hh=t(case_G * H))
    with torch.profiler.profile() as prof:
        y, h, c = ops.recurrence(mode, **args, path=path)
        grads = torch.autograd.grad((y.sum() + h.sum()), [v for v in args.values() if v is not None])
    names = {e.name for e in prof.events()}
    y_ref, h_ref, _ = reference.recurrence(mode, **args)
    ref_grads = torch.autograd.grad((y_ref.sum() + h_ref.sum()), [v for v in args.values() if v is not None])
    err = max((a - b).abs().max().item() for a, b in zip([y, h, *grads], [y_ref, h_ref, *ref_grads]))
    return "rnnext::persistent_forward" in names, "rnnext::persistent_backward" in names, err


@pytest.mark.parametrize("G", [4, 3, 1])
def test_cpu_emulation_runs_where_it_fits_and_falls_back_just_above(G):
    """Path 2 runs the persistent code where the (emulated) device has room, the per-step loop just
    above that; both give the reference's results."""
    fits = [H for H in range(1, 400) if plan(False, G, 3, H, "fp64", EMULATED)["fits"]]
    largest = max(fits)
    assert fits == list(range(1, largest + 1))  # fits up to a size, then never
    for H, want in ((largest, True), (largest + 1, False)):
        fwd, bwd, err = persistent_ran(G, 3, 3, H, torch.float64, path=2)
        assert fwd == want
        assert bwd == plan(True, G, 3, H, "fp64", EMULATED)["fits"]
        assert err < 1e-9
    fwd, bwd, err = persistent_ran(G, 3, 3, 5, torch.float64, path=1)
    assert not fwd and not bwd and err < 1e-12


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_default_path_is_per_step(device):
    """Opt-in until it passed on a GPU: path 0 runs the per-step loop on both devices."""
    fwd, bwd, _ = persistent_ran(4, 2, 2, 8, torch.float64, path=0)
    assert not fwd and not bwd


def test_backend_names_map_to_paths():
    x = torch.empty(1)
    assert functional._path("persistent", x) == 2 and functional._path("step", x) == 1
    assert functional._path("auto", x) == 0 and functional._path("fused", x) == 0


@pytest.mark.parametrize("T,B,H", list(itertools.product([1, 5], [1, 3], [1, 17])))
def test_emulated_tiles_bf16(T, B, H):
    """16-bit types go through the tensor-core tiling (emulated: 16x16 tiles, padding of B, K and N)."""
    fwd, bwd, err = persistent_ran(4, T, B, H, torch.bfloat16, path=2)
    assert fwd and bwd
    assert err < 0.1  # bf16 has 8 bits of mantissa; the low-precision rule is tested in test_layers.py


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_barrier_timeout_raises_instead_of_hanging():
    """A CTA that never arrives (simulated: each barrier expects one CTA too many) makes the kernel stop
    after the timeout and the host raise, naming the kernel; the GPU stays usable."""
    code = """
import torch, rnnext
x, w_ih = torch.randn(4, 2, 3, device="cuda"), torch.randn(32, 3, device="cuda")
h0, c0, w = torch.zeros(2, 8, device="cuda"), torch.zeros(2, 8, device="cuda"), torch.randn(32, 8, device="cuda")
try:
    torch.ops.rnnext.lstm_seq(x, w_ih, h0, c0, w, None, None, None, None, 0.0, True, 2)
except RuntimeError as e:
    assert "persistent_forward timed out in its grid barrier" in str(e), str(e)
    print("raised")
torch.cuda.synchronize()
print(torch.ones(3, device="cuda").sum().item())
"""
    env = dict(os.environ, RNNEXT_TEST_BARRIER_TIMEOUT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["raised", "3.0"]
