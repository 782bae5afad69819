"""The CPU's fused float32 steps (cpu/launcher.h gemm_cell_steps, cell_gemm_steps): one parallel region per
chunk of steps, each thread a block of 16-unit columns (the last one ragged) and, for the layer-normalised
cells, a share of the rows. Three threads on 37 hidden units and 5 rows split both unevenly; lengths and a
zoneout mask exercise the gradient that bypasses the GEMM (`direct`)."""
import pytest
import torch

from rnnext import ops, reference
from conftest import cast, close, outputs_and_grads
from test_layernorm import make_args as ln_args
from test_sequence import make_args as sequence_args
from test_zoneout import make_args as zoneout_args

BUILT = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@BUILT
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LNLSTM", "LNGRU"])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("zoneout", [False, True])
def test_float32_threads_match_reference(three_threads, mode, lengths, reverse, zoneout):
    T, B, H = 11, 5, 37
    if mode.startswith("LN"):
        args = ln_args(mode, T, B, H, "cpu", lengths, seed=3, I=19)
        parts = 2 if mode == "LNLSTM" else 1
        mask = torch.bernoulli(torch.full((T, B, parts * H), 0.3, dtype=torch.float64),
                               generator=torch.Generator().manual_seed(5))
    else:
        args, mask = zoneout_args(mode, T, B, H, "cpu", lengths, seed=3, I=19)
    kw = dict(reverse=reverse, clip=0.9, zoneout_mask=mask if zoneout else None)
    low = cast(args, torch.float32)
    got = outputs_and_grads(ops.recurrence, low, **dict(kw, zoneout_mask=mask.float() if zoneout else None))
    want = outputs_and_grads(reference.recurrence, args, **kw)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        close(a.double(), b, rtol=1e-5)


@BUILT
@pytest.mark.parametrize("mode,H", [("LSTM", 512), ("GRU", 512), ("LNLSTM", 512), ("GRU", 1024), ("LNGRU", 1024),
                                    ("MINIMAL_GRU", 512), ("RNN", 1024)])
@pytest.mark.parametrize("lengths", [False, True])
def test_float32_wide_gates_match_reference(mode, H, lengths):
    """Wide layers: the GEMMs run over K in blocks (cpu/gemm.h panel_blocks: the backward step's K = G*H
    against a thread's columns, dx's K = G*H), and rows of G*H floats that are a multiple of 1024 are padded:
    backward's gate gradients (gate_stride), which every backward cell (LSTM, GRU, MINIMAL_GRU, RNN, LNLSTM,
    LNGRU: G*H = 2048, 3072, 1024, 1024, 2048, 3072) writes and every GEMM reads with that row stride; GRU at
    H = 512 (1536) unpadded. Weights scaled by 1/16 so that the gates do not saturate."""
    if mode.startswith("LN"):
        args = ln_args(mode, 3, 3, H, "cpu", lengths, seed=6, I=19)
    elif mode in ("LSTM", "GRU"):
        args, _ = zoneout_args(mode, 3, 3, H, "cpu", lengths, seed=6, I=19)
    else:
        cell = {"MINIMAL_GRU": "minimal_gru", "RNN": "rnn_tanh"}[mode]
        args = sequence_args(cell, 3, 3, H, "cpu", lengths=lengths, seed=6)
    args.update({k: (args[k] / 16).detach().requires_grad_() for k in ("w_ih", "w_hh")})
    low = cast(args, torch.float32)
    got = outputs_and_grads(ops.recurrence, low, clip=0.9)
    want = outputs_and_grads(reference.recurrence, args, clip=0.9)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        close(a.double(), b, rtol=1e-5)


@BUILT
def test_fewer_openmp_threads_than_blocks():
    """OpenMP may give a fused region fewer threads than it asks for (here OMP_THREAD_LIMIT=1 against three
    blocks): the blocks then go round robin, every one still computed."""
    import os
    import subprocess
    import sys
    script = ("import sys, torch; sys.path.insert(0, 'tests'); import test_fused_steps as t; torch.set_num_threads(3); "
              "t.test_float32_threads_match_reference(None, 'LNLSTM', True, False, True); "
              "t.test_float32_threads_match_reference(None, 'LSTM', True, True, True); print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_THREAD_LIMIT="1"))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@BUILT
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LNLSTM", "LNGRU"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("T,B,H", [(11, 5, 37), (2, 90, 256)])
def test_16bit_threads_rule(three_threads, mode, dtype, lengths, T, B, H):
    """16-bit steps with a small GEMM run fused, the GEMM in float; above 2^24 multiply-adds a step
    (B=90, H=256) at::mm per step: DESIGN.md's rule against the reference at the same dtype (root-mean-square
    error at most twice the reference's, plus 1e-4 of the exact RMS), outputs and gradients."""
    if mode.startswith("LN"):
        args = ln_args(mode, T, B, H, "cpu", lengths, seed=4, I=19)
    else:
        args, _ = zoneout_args(mode, T, B, H, "cpu", lengths, seed=4, I=19)
    low = cast(args, dtype)
    exact = outputs_and_grads(reference.recurrence, args, clip=0.9)
    got = outputs_and_grads(ops.recurrence, low, clip=0.9)
    base = outputs_and_grads(reference.recurrence, low, clip=0.9)
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    for g, b, e in zip(got, base, exact, strict=True):
        assert g.dtype == dtype
        assert rms(g.double() - e) <= 2 * rms(b.double() - e) + 1e-4 * rms(e)
