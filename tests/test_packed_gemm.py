"""The CPU's 16-bit GEMMs on AMX (csrc/cpu/packed.h): oneDNN's brgemm with B packed by cpublas::pack, chosen at
run time where cpublas packs the dtype and a probe GEMM is right, else the fallback (ATen's GEMM, as before).
Everywhere: the selection, the switch that forces the fallback, the packed path's tiling and padding on plain C++
kernels ("emulated"), the fallback's GEMMs, and the layers in 16 bits (lengths, both directions) on whichever
path the CPU takes and on the forced fallback, against float64. Where cpublas packs the dtype (AMX) the same GEMMs
run packed too; elsewhere those cases skip, saying so."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnext
from rnnext import ops
import conftest

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
AMX_FLAG = {torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}  # what cpublas needs to pack the dtype


def path(dtype):
    """(the path CpuLauncher::gemm takes for dtype, whether cpublas packs it)"""
    return tuple(torch.ops.rnnext.cpu_gemm_path(dtype))


def cpu_flags():
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.fixture
def allowed():
    """set(on): the packed path allowed or not for the test; the switch restored after."""
    before = torch.ops.rnnext.set_cpu_packed(True)
    torch.ops.rnnext.set_cpu_packed(before)
    yield torch.ops.rnnext.set_cpu_packed
    torch.ops.rnnext.set_cpu_packed(before)


def ran_packed(fn):
    """fn()'s result and whether the profiler saw the packed GEMM run."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, any(e.name == "rnnext::packed_gemm" for e in prof.events())


# -- selection -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_exactly_where_cpublas_packs(dtype, allowed):
    """Packed where cpublas packs the dtype (and oneDNN is on), the fallback otherwise; a CPU without the AMX flag
    for the dtype never packs. Where cpublas packs, "packed" also says the probe's tiny GEMM was right."""
    allowed(True)
    name, can = path(dtype)
    assert name == ("packed" if can and torch.backends.mkldnn.enabled else "aten"), (name, can)
    if AMX_FLAG[dtype] not in cpu_flags():
        assert not can and name == "aten"


@pytest.mark.parametrize("dtype", DTYPES)
def test_switch_forces_the_fallback(dtype, allowed):
    can = path(dtype)[1]
    allowed(True)
    assert allowed(False) is True
    assert path(dtype) == ("aten", can)
    assert allowed(True) is False  # the previous state
    assert path(dtype)[0] == ("packed" if can else "aten")


def test_other_dtypes_never_pack(allowed):
    allowed(True)
    assert path(torch.float32)[0] in ("brgemm", "aten") and not path(torch.float32)[1]
    assert path(torch.float64) == ("aten", False)


@pytest.mark.parametrize("env,allowed_at_load", [(None, True), ("1", True), ("0", False)])
def test_environment_variable_read_at_load(env, allowed_at_load):
    """RNNEXT_CPU_PACKED=0 when the library loads forces the fallback; anything else leaves the choice to the CPU."""
    code = ("import torch, rnnext; print(torch.ops.rnnext.cpu_gemm_path(torch.bfloat16)[0], "
            "torch.ops.rnnext.set_cpu_packed(True))")
    environ = {k: v for k, v in os.environ.items() if k != "RNNEXT_CPU_PACKED"}
    if env is not None:
        environ["RNNEXT_CPU_PACKED"] = env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    name, was = out.stdout.split()
    assert was == str(allowed_at_load)
    assert name == ("packed" if allowed_at_load and path(torch.bfloat16)[1] else "aten")


# -- the GEMMs -------------------------------------------------------------------------------------------------

# (M, K, N): the tile is 128 rows by panels of 64 columns, K in blocks of 512 (an odd block padded by one)
SHAPES = [(130, 37, 70),    # ragged M and N, odd K
          (3, 1100, 64),    # three K blocks, the last even; one whole panel
          (5, 1025, 5),     # an odd last block of one row; N within one panel
          (129, 513, 257),  # everything ragged, two K blocks
          (200, 64, 300),   # M past a tile: the weight gradients' per-call packing
          (1, 1, 1), (4, 0, 7), (0, 6, 3)]


def integers(*shape, gen):
    """Mostly zeros, else -2..2: every sum exact in 16 bits, so every path's result is exactly the float64 one."""
    v = torch.randint(-2, 3, shape, generator=gen, dtype=torch.float64)
    return v * (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.25)


def operands(M, K, N, add, transposed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b = integers(M, K, gen=gen), integers(K, N, gen=gen)
    if transposed:  # as x^T and w^T arrive: views of the transposes
        a, b = integers(K, M, gen=gen).t(), integers(N, K, gen=gen).t()
    return a, b, integers(M, N, gen=gen) if add else None


HOW = ["emulated", "fallback", "packed"]


def run_gemm(how, a, b, add, weight, allowed):
    """cpu_gemm on the path asked for: emulated (the packed tiling on plain kernels), the forced fallback, or
    packed (skips where cpublas does not pack the dtype)."""
    if how == "emulated":
        return torch.ops.rnnext.cpu_gemm(a, b, add, "emulated"), True
    if how == "packed" and not path(a.dtype)[1]:
        pytest.skip(f"cpublas does not pack {a.dtype} on this CPU (no {AMX_FLAG[a.dtype]}): the packed path never runs")
    allowed(how == "packed")
    return ran_packed(lambda: torch.ops.rnnext.cpu_gemm(a, b, add, "weight" if weight else "gemm"))


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("add", [False, True], ids=["no-add", "add"])
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "per-call"])
def test_gemm_exact(how, dtype, M, K, N, add, weight, allowed):
    """out = add + a @ b exactly (integers), on transposed and contiguous operands. b as a weight goes through
    right_operand (packed once); per call it is packed where a has a tile of rows (128), else the fallback runs."""
    for transposed in (False, True):
        a, b, c = operands(M, K, N, add, transposed, seed=M + K + N)
        want = (a @ b + (c if add else 0)).to(dtype)
        cast = [t.to(dtype) if t is not None else None for t in (a, b, c)]
        got, ran = run_gemm(how, *cast, weight, allowed)
        assert got.dtype == dtype and torch.equal(got, want), (transposed, (got.double() - want.double()).abs().max())
        if how == "packed":
            assert ran == (weight or M >= 128)
        elif how == "fallback":
            assert not ran


@pytest.mark.parametrize("M,K,N", SHAPES + [(64, 64, 64), (72, 9, 1040)])
@pytest.mark.parametrize("add", [False, True], ids=["no-add", "add"])
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "per-call"])
def test_float_gemm_exact(M, K, N, add, weight):
    """float32 (brgemm): transposed operands are copied through register transposes in 64x64 blocks, whole 8x8
    or 16x16 ones and then the ragged edges; b in panels of 32 columns (the last one's tail zero), K in blocks of
    256 (cpu/gemm.h): as a weight (right_operand), or per call where a has 128 rows or more."""
    for transposed in (False, True):
        a, b, c = operands(M, K, N, add, transposed, seed=M + K + N)
        want = (a @ b + (c if add else 0)).float()
        how = "weight" if weight else "gemm"
        got = torch.ops.rnnext.cpu_gemm(a.float(), b.float(), c.float() if add else None, how)
        assert got.dtype == torch.float32 and torch.equal(got, want), (transposed, (got - want).abs().max())


@pytest.mark.parametrize("how", ["emulated", "packed"])
def test_non_finite_past_a_row_is_never_read(how, allowed):
    """An odd K is padded with a zero row of B and a zero column of A, copied: the element past a row of a (here
    inf, in a wider matrix) would otherwise meet the zero row and give NaN."""
    wide = torch.full((3, 6), float("inf"), dtype=torch.bfloat16)
    wide[:, :5] = 1
    got, _ = run_gemm(how, wide[:, :5], torch.ones(5, 2, dtype=torch.bfloat16), None, True, allowed)
    assert torch.equal(got, torch.full((3, 2), 5.0, dtype=torch.bfloat16))


def test_cpu_gemm_checks_its_arguments():
    a = torch.ones(2, 3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected a \\[M, K\\] and b \\[K, N\\]"):
        torch.ops.rnnext.cpu_gemm(a, a, None, "gemm")
    with pytest.raises(RuntimeError, match="expected how"):
        torch.ops.rnnext.cpu_gemm(a.float(), a.t().float(), None, "emulated")


# -- the layers ------------------------------------------------------------------------------------------------

LAYERS = {  # (rnnext's, torch.nn's, I, H, options, B, T)
    "lstm": (rnnext.LSTM, nn.LSTM, 16, 24, dict(num_layers=2), 5, 7),
    "gru": (rnnext.GRU, nn.GRU, 16, 24, dict(num_layers=2), 5, 7),
    # the steps' GEMMs are gemm's (not the fused float steps): packed on AMX at any size
    "lstm-proj": (rnnext.LSTM, nn.LSTM, 16, 24, dict(num_layers=2, proj_size=8), 5, 7),
    # B * H * 4H > 2^24: steps one by one through gemm; I, H >= 128: the weight gradients packed per call
    "lstm-large": (rnnext.LSTM, nn.LSTM, 130, 264, dict(num_layers=1), 64, 4),
}


def outputs_and_grads(model, x, lengths):
    """Padded outputs, final states and the gradients of a random projection of them w.r.t. x and every
    parameter."""
    x = x.detach().requires_grad_()
    out, hn = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
    outs = [pad_packed_sequence(out)[0], *(hn if isinstance(hn, tuple) else (hn,))]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum() for o in outs)
    return outs + list(torch.autograd.grad(loss, [x, *model.parameters()]))


@pytest.mark.parametrize("choice", ["default", "fallback"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers_low_precision_rule(layer, dtype, choice, allowed):
    """Forward and backward in 16 bits, bidirectional, random lengths: DESIGN.md's rule (error vs float64 at most
    twice torch.nn's at the dtype) for outputs, final states and every gradient; the profiler shows the packed GEMM
    ran exactly where it was chosen."""
    ours_cls, theirs_cls, I, H, kw, B, T = LAYERS[layer]
    torch.manual_seed(31)
    ours = ours_cls(I, H, bidirectional=True, dtype=torch.float64, **kw)
    theirs = theirs_cls(I, H, bidirectional=True, dtype=torch.float64, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    exact = outputs_and_grads(theirs, x, lengths)
    base = outputs_and_grads(theirs.to(dtype), x.to(dtype), lengths)
    allowed(choice == "default")
    with rnnext.use_backend("fused"):
        got, ran = ran_packed(lambda: outputs_and_grads(ours.to(dtype), x.to(dtype), lengths))
    conftest.assert_low_precision_rule(got, base, exact, dtype)
    assert ran == (choice == "default" and path(dtype)[0] == "packed")
