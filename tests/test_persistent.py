"""The persistent path: its planner (persistent/plan.h), where it runs or falls back, and its per-CTA code
(persistent/cta.h) against the float64 reference, with the profiler showing that it ran. On CPU that code
runs through the emulation (cpu/emulation.h: every CTA's 256 threads with the device's plan, warp-wide MMAs
over the warp's registers), on CUDA as the kernels. The emulation runs only where a test asks for it
(RNNEXT_TEST_EMULATE_PERSISTENT, set for the test session in conftest.py)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import rnnext
from rnnext import ops, reference
from conftest import cast, cpu_and_cuda, tensors_in

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")

# (sms, smem_per_block, arch): cuda/persistent.cuh device_capacity() on an H100
H100 = (132, 232448, 90)
FIELDS = ("fits", "ctas", "units", "MT", "NT", "KT", "ktile", "smem", "elems", "local", "wn")
EMULATED = (8, 232448, 90)  # cpu/emulation.h's device, at its default of 8 SMs
TYPES = {"bf16": (2, 1, torch.bfloat16), "fp16": (2, 1, torch.float16), "tf32": (4, 2, torch.float32),
         "fp64": (8, 0, torch.float64)}  # (bytes, persistent::Mma, dtype)
# per cell: G, Z, SAVED, ZONED, reads_h_prev, reads_out (csrc/cells/*.h)
CELLS = {"lstm": (4, 2, 4, 2, 0, 0), "gru": (3, 1, 4, 1, 1, 0), "minimal_gru": (2, 1, 2, 0, 1, 0),
         "rnn_tanh": (1, 1, 0, 0, 0, 1), "slstm": (4, 4, 6, 0, 0, 0)}


def parts(cell, backward):
    """persistent/cta.h forward_parts / backward_parts."""
    G, Z, K, ZN, h_prev, out = CELLS[cell]
    return 1 + K + h_prev + Z - 1 + out + ZN if backward else G + ZN + 1 + K + Z - 1


def plan(backward, cell, B, H, dtype, capacity=H100, head=0):
    elem, mma, _ = TYPES[dtype]
    return dict(zip(FIELDS, torch.ops.rnnext.persistent_plan(backward, CELLS[cell][0], B, H, elem, mma,
                                                             parts(cell, backward), *capacity, head)))


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("B", [1, 5, 16, 33, 64, 65])
@pytest.mark.parametrize("H", [4, 8, 24, 100, 256, 768, 1024, 2048])
@pytest.mark.parametrize("dtype", list(TYPES))
def test_plan_is_consistent(backward, cell, B, H, dtype):
    p = plan(backward, cell, B, H, dtype)
    G = CELLS[cell][0]
    assert p["units"] % 8 == 0 or not p["fits"]
    if not p["fits"]:
        return
    elem = TYPES[dtype][0]
    K, N = (G * H, p["units"]) if backward else (H, G * p["units"])
    assert (p["ctas"] - 1) * p["units"] < H <= p["ctas"] * p["units"]  # every unit, no idle CTA
    assert p["ctas"] <= H100[0] and p["smem"] <= H100[1]
    assert p["MT"] * 16 >= B and p["NT"] * 8 >= N and p["KT"] * p["ktile"] * 8 >= K  # 8 warps split K
    assert p["elems"] * 256 >= B * p["units"]
    assert H % (16 // elem) == 0 and B <= 64 and dtype != "fp64"
    assert p["ktile"] == (16 if elem == 2 else 8)
    assert not p["local"] and p["wn"] == 1


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("B", [1, 15, 33])
@pytest.mark.parametrize("H,head", [(768, 16), (256, 4), (96, 24), (64, 32), (512, 64), (48, 3), (256, 128)])
@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
def test_head_plans(backward, cell, B, H, head, dtype):
    """Head-wise: CTAs of whole heads in whole 16-byte pieces (the fewest heads), as many CTAs as that makes
    whatever the SMs (no grid barrier), the warps' n-groups and k-groups covering N and K within the register
    tiles; where that does not fit, the dense plan."""
    p, dense = plan(backward, cell, B, H, dtype, head=head), plan(backward, cell, B, H, dtype)
    if not p["local"]:
        assert p == dense
        return
    G, elem = CELLS[cell][0], TYPES[dtype][0]
    units = p["units"]
    assert p["fits"] and units == math.lcm(head, 16 // elem)
    assert p["ctas"] * units == H
    K, N = (G * units, units) if backward else (units, G * units)
    assert p["wn"] in (1, 2, 4, 8) and p["NT"] * 8 * p["wn"] >= N and p["KT"] * p["ktile"] * (8 // p["wn"]) >= K
    assert p["NT"] <= (1 if backward else 4) and p["elems"] * 256 >= B * units
    assert plan(backward, cell, B, H, dtype, (1,) + H100[1:], head) == p  # not limited by the SMs


def test_which_head_plans_are_local():
    """The FlashRNN configuration (B = 16, 768 units as 48 heads of 16) is 48 CTAs of one head both ways, each warp
    one n-tile forward; heads of 64 fit backward (8 n-tiles, one per warp), of 128 not (the dense plan), nor
    B * units beyond the threads' elements."""
    f, b = plan(False, "lstm", 16, 768, "bf16", head=16), plan(True, "lstm", 16, 768, "bf16", head=16)
    assert (f["local"], f["ctas"], f["units"], f["wn"], f["NT"], f["KT"]) == (1, 48, 16, 8, 1, 1)
    assert (b["local"], b["ctas"], b["units"], b["wn"], b["NT"]) == (1, 48, 16, 2, 1)
    wide = plan(True, "lstm", 4, 512, "fp16", head=64)
    assert wide["local"] and wide["wn"] == 8
    assert not plan(True, "lstm", 4, 512, "fp16", head=128)["local"]
    assert not plan(True, "lstm", 17, 768, "bf16", head=16)["local"]  # 17 * 16 elements > 256 threads
    assert plan(False, "lstm", 16, 256, "bf16", head=4)["units"] == 8  # two heads: a 16-byte piece


def test_what_does_not_fit():
    """No plan for float64, rows that are not whole 16-byte pieces, B > 64, or weights beyond the register
    fragments (forward: 8 k-tiles of 16 a warp, H <= 1024 in 16-bit; TF32's k-tiles of 8, H <= 512)."""
    assert not plan(False, "lstm", 16, 256, "fp64")["fits"]
    assert not plan(False, "lstm", 16, 100, "bf16")["fits"] and plan(False, "lstm", 16, 104, "bf16")["fits"]
    assert not plan(False, "lstm", 65, 256, "bf16")["fits"]
    assert plan(False, "lstm", 16, 1024, "bf16")["fits"] and not plan(False, "lstm", 16, 1040, "bf16")["fits"]
    assert plan(False, "lstm", 16, 512, "tf32")["fits"] and not plan(False, "lstm", 16, 520, "tf32")["fits"]
    assert not plan(True, "lstm", 33, 256, "bf16")["fits"]  # backward: one element a thread, B * 8 <= 256


def test_no_plan_below_sm80():
    """The mma instructions need sm_80: below, no plan (the kernel would trap)."""
    for arch in (70, 75):
        old = H100[:2] + (arch,)
        assert not plan(False, "lstm", 16, 256, "bf16", old)["fits"]
        assert not plan(True, "gru", 16, 256, "fp16", old)["fits"]
    assert plan(False, "lstm", 16, 256, "bf16", H100[:2] + (80,))["fits"]


@pytest.mark.parametrize("cell,B,H,dtype,directions", [
    ("lstm", 16, 768, "bf16", "fb"), ("lstm", 16, 768, "fp16", "fb"), ("lstm", 1, 256, "bf16", "fb"),
    ("lstm", 1, 256, "tf32", "fb"), ("gru", 16, 768, "bf16", "fb"), ("rnn_tanh", 1, 256, "tf32", "fb"),
    ("lstm", 32, 512, "bf16", "fb"), ("lstm", 64, 512, "bf16", "f"), ("gru", 16, 1024, "bf16", "fb")])
def test_issue_configs_fit_an_h100(cell, B, H, dtype, directions):
    """The configurations of the performance targets are planned on chip (backward at B = 64 is not: one cell
    element a thread)."""
    for d in directions:
        assert plan(d == "b", cell, B, H, dtype)["fits"], (d, cell, B, H, dtype)


def test_units_fill_the_register_tiles():
    """Forward: the most units a CTA whose gate rows fill the 4 register n-tiles (fewest CTAs) and whose cell
    elements (B * units) the threads hold, two each; backward: 8."""
    for cell, units in (("lstm", 8), ("gru", 8), ("minimal_gru", 16), ("rnn_tanh", 32)):
        p = plan(False, cell, 16, 768, "bf16")
        assert p["units"] == units and p["ctas"] == 768 // units and p["NT"] == -(-CELLS[cell][0] * units // 8)
        assert plan(True, cell, 16, 768, "bf16")["units"] == 8
    assert plan(False, "rnn_tanh", 20, 768, "bf16")["units"] == 24
    assert plan(False, "rnn_tanh", 64, 768, "bf16")["units"] == 8
    assert plan(False, "lstm", 16, 768, "bf16")["KT"] == 6 and plan(True, "lstm", 16, 768, "bf16")["KT"] == 24


# ---- the per-CTA code, run ------------------------------------------------------------------------

def make_args(cell, T, B, H, dtype, seed, lengths=False, bias=True, device="cpu", head=0):
    G, D = CELLS[cell][0], head or H
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()

    args = dict(x=t(T, B, 5), w_ih=t(G * H, 5), w_hh=t(G * H, D, scale=1 / D ** 0.5),
                states=tuple(t(B, H) for _ in range(CELLS[cell][1])), b_ih=t(G * H) if bias else None,
                b_hh=t(G * H) if bias else None)
    if cell == "slstm":  # a normaliser n0 > 0 (n0 = 0 restarts the unit: tests/test_slstm.py)
        h0, c0, n0, m0 = args["states"]
        args["states"] = (h0, c0, (n0.detach().abs() + 0.5).requires_grad_(), m0)
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        lens = lens.to(device)
    return args, lens


def outputs_and_grads(fn, args, **kw):
    """y and the final states, and the gradients of a fixed random projection of them w.r.t. every tensor
    argument."""
    y, states = fn(**args, **kw)
    outs = [y, *states]
    g = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    leaves = list(tensors_in(args.values()))
    return [o.detach() for o in outs] + [d.detach() for d in torch.autograd.grad(loss, leaves)]


def ran(fn):
    """fn()'s result and which persistent ranges the profiler saw: (result, forward ran, backward ran)."""
    with torch.profiler.profile() as prof:
        out = fn()
    names = {e.name for e in prof.events()}
    return out, "rnnext::persistent_forward" in names, "rnnext::persistent_backward" in names


def relative_errors(got, want):
    """Per tensor, the largest error relative to that tensor's largest magnitude."""
    return [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want,
                                                                                                      strict=True)]


def check_against_reference(cell, T, B, H, dtype, tf32=True, want=(True, True), **kw):
    """The persistent path (asserting it ran as `want` says) vs the float64 reference: within the DESIGN.md rule
    (twice the error of the per-step path at the same precision) for 16-bit types; TF32 (the per-step path on
    CPU multiplies in exact float32): within 2^-9 of each tensor's magnitude."""
    lengths = kw.pop("lengths", False)
    args, lens = make_args(cell, T, B, H, TYPES[dtype][2], seed=T * 100 + B * 10 + H, lengths=lengths,
                           bias=kw.pop("bias", True), head=kw.pop("head", 0))
    exact = cast(args, torch.float64)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        got, fwd, bwd = ran(lambda: outputs_and_grads(ops.recurrence, args, cell=cell, lengths=lens, path=2, **kw))
        step = outputs_and_grads(ops.recurrence, args, cell=cell, lengths=lens, path=1, **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    ref = outputs_and_grads(reference.recurrence, exact, cell=cell, lengths=lens, **kw)
    assert (fwd, bwd) == want
    ours, base = relative_errors(got, ref), relative_errors(step, ref)
    for i, (e, b) in enumerate(zip(ours, base)):
        bound = 2 ** -9 if dtype == "tf32" else 2 * b + 2 ** -10
        assert e <= bound, (i, e, b)
    return got


OPTIONS = {"plain": {}, "lengths": dict(lengths=True, reverse=True, clip=0.3), "nobias": dict(bias=False),
           "zoneout mask": dict(zoneout_mask="mask"), "zoneout eval": dict(zoneout=0.3)}


def with_options(cell, T, B, H, name):
    kw = dict(OPTIONS[name])
    if kw.get("zoneout_mask") == "mask":
        parts_ = CELLS[cell][3]
        kw["zoneout_mask"] = torch.bernoulli(torch.full((T, B, parts_ * H), 0.4),
                                             generator=torch.Generator().manual_seed(3))
    return kw


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "tf32"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("T,B,H", [(1, 1, 8), (5, 17, 24)])
def test_persistent_matches_reference(cell, dtype, option, T, B, H):
    """Every cell and option through the per-CTA code (B = 17: two m-tiles; H = 24: three CTAs)."""
    if option.startswith("zoneout") and not CELLS[cell][3]:
        pytest.skip("the cell has no zoneout")
    kw = with_options(cell, T, B, H, option)
    if "zoneout_mask" in kw:
        kw["zoneout_mask"] = kw["zoneout_mask"].to(TYPES[dtype][2])
    check_against_reference(cell, T, B, H, dtype, **kw)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_two_elements_a_thread(cell):
    """B * units > 256: the forward's threads have two cell elements each (B = 40, units 8: 320); the backward
    does not fit (one element a thread) and runs per step."""
    check_against_reference(cell, 3, 40, 16, "bf16", want=(True, False), lengths=True)


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_k_split_over_warps(monkeypatch, cell):
    """With an H100's 132 SMs: H = 264 (17 k-tiles of 16, warps with 3, 2 and none), the backward's K = G*H
    over every warp."""
    monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "1,sms=132")
    check_against_reference(cell, 2, 2, 264, "bf16")


HEADS = [(5, 15, 48, 16), (3, 3, 24, 8), (2, 20, 32, 4), (4, 2, 64, 32), (1, 1, 16, 8)]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "tf32"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("T,B,H,head", HEADS)
def test_head_wise_persistent_is_the_dense_plan_on_the_block_diagonal_matrix(cell, dtype, option, T, B, H, head):
    """Head-wise, CTAs of whole heads (local plans: no grid barrier, K the CTA's own units) both ways give what the
    dense plan (checked against the reference above) gives on the dense block-diagonal W_hh, up to the order of
    float sums: outputs, every gradient, W_hh's on the diagonal blocks. Heads of 16, 8, 4 (two a CTA in 16-bit),
    32 (warps in n-groups of two k-groups backward) and T = B = 1."""
    if option.startswith("zoneout") and not CELLS[cell][3]:
        pytest.skip("the cell has no zoneout")
    G = CELLS[cell][0]
    assert all(plan(b, cell, B, H, dtype, EMULATED, head)["local"] for b in (False, True))
    assert all(plan(b, cell, B, H, dtype, EMULATED)["fits"] for b in (False, True))
    kw = with_options(cell, T, B, H, option)
    if "zoneout_mask" in kw:
        kw["zoneout_mask"] = kw["zoneout_mask"].to(TYPES[dtype][2])
    lengths = kw.pop("lengths", False)
    args, lens = make_args(cell, T, B, H, TYPES[dtype][2], seed=T + B + H, lengths=lengths,
                           bias=kw.pop("bias", True), head=head)
    dense = dict(args, w_hh=reference.dense_heads(args["w_hh"].detach(), H).requires_grad_())
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        runs = [ran(lambda: outputs_and_grads(ops.recurrence, a, cell=cell, lengths=lens, path=2, **kw))
                for a in (args, dense)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    (got, *ran_local), (want, *ran_dense) = runs
    assert ran_local == ran_dense == [True, True]
    w = len(got) - len(list(tensors_in(args.values()))) + 2  # the leaves: x, w_ih, w_hh, ...
    k = H // head
    want[w] = want[w].view(G, k, head, k, head).diagonal(0, 1, 3).permute(0, 3, 1, 2).reshape(G * H, head)
    # the same products summed in another order (the k-groups differ), then rounded (16-bit, TF32 operands)
    tol = 2 ** -11 if dtype == "tf32" else 2 ** -10
    errors = relative_errors(got, [b.double() for b in want])
    assert max(errors) <= tol, errors


def test_head_wise_without_a_local_plan_runs_the_dense_one_or_per_step(monkeypatch):
    """Heads of 128 units (beyond a CTA's register tiles both ways) take the dense plan with its grid barrier where
    the SMs allow (32 CTAs on 64), else the per-step path."""
    monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "1,sms=64")
    check_against_reference("lstm", 2, 2, 256, "bf16", head=128, want=(True, True))
    monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "1,sms=1")
    check_against_reference("lstm", 2, 2, 256, "bf16", head=128, want=(False, False))


def test_fits_up_to_the_sms_then_falls_back(monkeypatch):
    """On the emulated 8 SMs, H = 64 is 8 CTAs of 8 units; H = 72 does not fit and runs per step."""
    check_against_reference("lstm", 3, 2, 64, "bf16")
    check_against_reference("lstm", 3, 2, 72, "bf16", want=(False, False))


def test_thread_and_cta_order_do_not_change_the_results(monkeypatch):
    """Each phase's threads and each step's CTAs in the other order give the same bits: no thread reads what
    another writes in the same phase, no CTA reads before its wait what another writes after its arrival."""
    results = []
    for setting in ("1", "1,reverse"):
        monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", setting)
        results.append([check_against_reference(cell, 4, 20, 40, "bf16", lengths=True, zoneout=0.2 if cell in
                                                 ("lstm", "gru") else 0.0, head=head) for cell in CELLS
                        for head in (0, 8)])
    for a, b in zip(*results):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_float64_and_float32_without_tf32_run_per_step():
    """fp64 stays per step; fp32 runs persistent only where torch allows TF32 matmuls."""
    for dtype, tf32 in (("fp64", True), ("tf32", False)):
        args, _ = make_args("lstm", 3, 2, 16, TYPES[dtype][2], seed=1)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            _, fwd, bwd = ran(lambda: outputs_and_grads(ops.recurrence, args, cell="lstm", path=2))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        assert not fwd and not bwd


def test_cpu_users_never_get_the_emulation(monkeypatch):
    """use_backend("persistent") on CPU runs the per-step loop unless a test asks for the emulation."""
    monkeypatch.delenv("RNNEXT_TEST_EMULATE_PERSISTENT")
    check_against_reference("lstm", 3, 2, 8, "bf16", want=(False, False))
    lstm = torch.nn.LSTM(3, 8).double()
    layer = rnnext.convert(torch.nn.LSTM(3, 8).double())
    layer.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with rnnext.use_backend("persistent"):
        (out, _), fwd, _ = ran(lambda: layer(x))
    assert not fwd
    torch.testing.assert_close(out, lstm(x)[0], rtol=1e-12, atol=1e-12)


def test_forcing_the_per_step_path_works_whatever_the_default(monkeypatch):
    """Where the persistent kernel is the default (the emulation told to act as such a device), path 0 runs it,
    path 2 too, and path 1 (per step, what use_backend("step") asks for) never does."""
    monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "default")
    args, _ = make_args("gru", 3, 2, 8, torch.bfloat16, seed=2)
    for path, want in ((0, True), (2, True), (1, False)):
        _, fwd, bwd = ran(lambda: outputs_and_grads(ops.recurrence, args, cell="gru", path=path))
        assert (fwd, bwd) == (want, want), path


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_a_failed_launch_falls_back_to_per_step(monkeypatch, cell):
    """A persistent launch that cannot run (on CUDA: cudaErrorCooperativeLaunchTooLarge and kin; here the
    emulation told to fail after planning) leaves the sequence to the per-step loop, with every step's
    projection already computed."""
    monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "fail")
    check_against_reference(cell, 5, 3, 8, "bf16", want=(False, False), lengths=True)


@pytest.mark.parametrize("backward", [False, True])
def test_a_timeout_gives_nan_and_the_next_call_raises(monkeypatch, backward):
    """A grid barrier that gives up (emulated) leaves NaN in the outputs (forward: y, h_n, c_n; backward: the
    gradients), no exception in that call (the host does not wait for the kernel); the next persistent launch
    raises, once; check_persistent raises too."""
    args, _ = make_args("lstm", 4, 2, 16, torch.bfloat16, seed=3)
    if backward:
        y, (h, c) = ops.recurrence("lstm", **args, path=2)
        monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "1,timeout")
        grads = torch.autograd.grad(y.float().sum() + h.float().sum(), [args["x"], args["w_hh"], args["states"][0]])
        assert all(torch.isnan(g).all() for g in grads)
    else:
        monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "1,timeout")
        with torch.no_grad():
            y, (h, c) = ops.recurrence("lstm", **args, path=2)
        assert torch.isnan(y).all() and torch.isnan(h).all() and torch.isnan(c).all()
    monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "1")
    with torch.no_grad(), pytest.raises(RuntimeError, match="timed out in its grid barrier"):
        ops.recurrence("lstm", **args, path=2)
    with torch.no_grad():
        y, _ = ops.recurrence("lstm", **args, path=2)
    assert torch.isfinite(y).all()
    monkeypatch.setenv("RNNEXT_TEST_EMULATE_PERSISTENT", "1,timeout")
    with torch.no_grad():
        ops.recurrence("lstm", **args, path=2)
    with pytest.raises(RuntimeError, match="timed out in its grid barrier"):
        torch.ops.rnnext.check_persistent()
    torch.ops.rnnext.check_persistent()  # reported once


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_layers_run_it_through_the_backend_switch(device):
    """use_backend("persistent") on a bfloat16 layer, two layers and both directions: every layer-direction's
    forward and backward run persistent (where they fit), within the rule of the per-step path."""
    torch.manual_seed(4)
    layer = rnnext.GRU(8, 16, num_layers=2, bidirectional=True).to(device, torch.bfloat16)
    exact = rnnext.GRU(8, 16, num_layers=2, bidirectional=True).to(device, torch.float64)
    exact.load_state_dict(layer.state_dict())
    x = torch.randn(5, 3, 8, device=device)
    errors = {}
    for backend in ("persistent", "step"):
        xb = x.to(torch.bfloat16).requires_grad_()
        with rnnext.use_backend(backend):
            (out, fwd, bwd) = ran(lambda: (lambda y: (y, torch.autograd.grad(y.float().sum(), xb)[0]))(layer(xb)[0]))
        assert (fwd, bwd) == ((True, True) if backend == "persistent" else (False, False))
        xe = x.double().requires_grad_()
        ye = exact(xe)[0]
        want = (ye, torch.autograd.grad(ye.sum(), xe)[0])
        errors[backend] = relative_errors(out, want)
    assert all(p <= 2 * s + 2 ** -10 for p, s in zip(errors["persistent"], errors["step"])), errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_barrier_timeout_on_the_gpu_is_reported_lazily_and_under_graph_replay():
    """A CTA that never arrives (simulated: each barrier expects one CTA too many) makes the kernel stop after
    the timeout with NaN outputs; check_persistent (or the next launch) raises; the same from a CUDA graph's
    replay; the GPU stays usable."""
    code = """
import torch, rnnext
x, w_ih = torch.randn(4, 2, 8, device="cuda").bfloat16(), torch.randn(32, 8, device="cuda").bfloat16()
h0, c0 = torch.zeros(2, 8, device="cuda").bfloat16(), torch.zeros(2, 8, device="cuda").bfloat16()
w = torch.randn(32, 8, device="cuda").bfloat16()
y = torch.ops.rnnext.lstm_seq(x, w_ih, w, None, None, h0, c0[None], None, None, save=False, path=2)[0]
torch.cuda.synchronize()
print("nan" if torch.isnan(y).all().item() else "numbers")
for _ in range(2):
    try:
        torch.ops.rnnext.check_persistent()
        print("quiet")
    except RuntimeError as e:
        assert "timed out in its grid barrier" in str(e), str(e)
        print("raised")
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    with torch.cuda.graph(g):
        y = torch.ops.rnnext.lstm_seq(x, w_ih, w, None, None, h0, c0[None], None, None, save=False, path=2)[0]
torch.ops.rnnext.check_persistent()  # capture launches nothing
g.replay()
try:
    torch.ops.rnnext.check_persistent()
    print("quiet")
except RuntimeError:
    print("raised")
print(torch.ones(3, device="cuda").sum().item())
"""
    env = dict(os.environ, RNNEXT_TEST_BARRIER_TIMEOUT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["nan", "raised", "quiet", "raised", "3.0"]
