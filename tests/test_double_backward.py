"""Double backward (create_graph=True) through the fused ops, whose backward recomputes the first order as a
graph with the reference (rnnext.ops._reference_grads): gradgradcheck in float64 for every cell's sequence op
(every option of it) and step op and for the layers; the first-order gradients equal the fused ones; second
derivatives equal the reference backend's."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnext
from rnnext import cells, ops
from conftest import close, cpu_and_cuda

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """gradgradcheck runs thousands of tiny ops: with more threads, the kernels' parallel regions (a few per
    step) cost more than the work, ~10 ms a step for the layer-norm cells on a loaded machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def check(fn, leaves, fast=False):
    """fn(*leaves) -> outputs through fused ops. Under create_graph=True the first-order gradients are the fused
    ones (gradgradcheck alone would pass on wrong ones: it checks the derivative of whatever the first order
    computes), as a graph; gradgradcheck passes."""
    outs = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]
    want = torch.autograd.grad(outs, leaves, v, retain_graph=True, allow_unused=True)
    got = torch.autograd.grad(outs, leaves, v, create_graph=True, allow_unused=True)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        if a is None or b is None:  # an input the cell ignores (the LSTM step's h): zeros on one side
            assert (b if a is None else a).abs().max() == 0, k
            continue
        close(a, b, 1e-10)
        assert a.requires_grad, k
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=fast)


def leaf_maker(device, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s, sc=0.5: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(device).requires_grad_()


# Every option of the sequence ops, each in a case (a cell takes those it has; zoneout's eval constant, where
# the cell has zoneout): the biases present or not, lengths, BPTT clipping, zoneout's masks and its constant,
# the LSTM's projection, eps off its default (always); out, the outputs used (None gradients for the others),
# and grad="weights" (x and the states constants) choose what the backward is asked. "plain" only where
# "zoneout_mask" (plain's inputs and outputs, and more) does not run: the file's time.
OPTIONS = {
    "plain": dict(unzoned=True),
    "no_bias": dict(bias=False, lengths=True, zoneout=0.4, out="y", grad="weights"),
    "clip": dict(lengths=True, clip=0.3, out="states"),
    "zoneout_mask": dict(mask=True, lengths=True, clip=0.3, zoned=True),
    "proj": dict(proj=1, lengths=True, clip=0.3, proj_cell=True),
}
SEQ_CASES = [(c.name, o) for c in cells.CELLS.values() for o, kw in OPTIONS.items()
             if (not kw.get("zoned") or c.zoned) and not (kw.get("unzoned") and c.zoned)
             and (not kw.get("proj_cell") or c.proj)]


def seq_problem(name, option, device, T=3, B=2, I=1, H=2, clip=None):
    """(fn, leaves): fn(*leaves) runs ops.recurrence (the fused op) of cell name with the option's arguments
    (clip: instead of the option's)."""
    cell, o = cells.get(name), OPTIONS[option]
    t = leaf_maker(device, 10 * list(cells.CELLS).index(name) + list(OPTIONS).index(option))
    G, P = cell.gates, o.get("proj") or H
    named = dict(x=t(T, B, I), w_ih=t(G * H, I), w_hh=t(G * H, P), h0=t(B, P))
    named.update({f"s{k}": t(B, H) for k in range(cell.others)})
    if o.get("bias", True):
        named.update(b_ih=t(G * H), b_hh=t(G * H))
    if cell.params:
        named.update(ln_w=(1 + t(cell.param_units * H, sc=0.3)).detach().requires_grad_(),
                     ln_b=t(cell.param_units * H, sc=0.3))
    if o.get("proj"):
        named["w_hr"] = t(P, H)
    kw = dict(clip=o.get("clip", 0.0) if clip is None else clip, zoneout=o.get("zoneout", 0.0) if cell.zoned else 0.0,
              eps=1e-3 if cell.params else 1e-5)
    if o.get("lengths"):
        kw["lengths"] = torch.tensor([T, 1, 2][:B], device=device)
    if o.get("mask"):
        g = torch.Generator().manual_seed(3)
        kw["zoneout_mask"] = torch.bernoulli(torch.full((T, B, cell.zoned * H), 0.4, dtype=torch.float64),
                                             generator=g).to(device)
    constant = {"x", "h0", *[f"s{k}" for k in range(cell.others)]} if o.get("grad") == "weights" else set()
    for k in constant:
        named[k] = named[k].detach()
    names = [k for k in named if k not in constant]

    def fn(*leaves):
        a = {**named, **dict(zip(names, leaves))}
        params = (a["ln_w"], a["ln_b"]) if cell.params else ()
        y, states = ops.recurrence(name, a["x"], a["w_ih"], a["w_hh"],
                                   (a["h0"], *[a[f"s{k}"] for k in range(cell.others)]), a.get("b_ih"), a.get("b_hh"),
                                   params=params, w_hr=a.get("w_hr"), **kw)
        return {"y": (y,), "states": states}.get(o.get("out"), (y, *states))

    return fn, [named[k] for k in names]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name,option", SEQ_CASES)
def test_seq_op(device, name, option):
    """With clip, the cases clip (else they would not test it), and gradgradcheck fails where the reference's
    clipping hook, in the recomputed forward, clips the second-order pass as well: a second derivative through
    the clip is the derivative of the clipped first order."""
    fn, leaves = seq_problem(name, option, device)
    if OPTIONS[option].get("clip"):
        clipped = torch.autograd.grad([o.sum() for o in fn(*leaves)], leaves)
        plain = torch.autograd.grad([o.sum() for o in seq_problem(name, option, device, clip=0.0)[0](*leaves)],
                                    leaves)
        assert any((a - b).abs().max() > 1e-3 for a, b in zip(clipped, plain))
    check(fn, leaves)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_inputs_that_depend_on_each_other(device):
    """The op's gradients are partial derivatives: x computed from w_ih, h0 from w_hh and one tensor as both
    biases must not count the paths between them twice (they did, differentiating w.r.t. the saved tensors)."""
    t = leaf_maker(device, 5)
    x0, w_ih, w_hh, h0, c0, b = t(3, 2, 2), t(8, 2), t(8, 2), t(2, 2), t(2, 2), t(8)

    def fn(x0, w_ih, w_hh, h0, c0, b):
        x = x0 * w_ih.sum()
        y, (h, c) = ops.recurrence("lstm", x, w_ih, w_hh, (h0 * w_hh.mean(), c0), b, b, clip=0.3)
        return y, h, c

    check(fn, [x0, w_ih, w_hh, h0, c0, b])


STEP_CELLS = [c.name for c in cells.CELLS.values() if not c.rows]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", STEP_CELLS)
@pytest.mark.parametrize("out", ["all", "h"])
def test_cell_op(device, name, out):
    """ops.step on torch.ops.rnnext.<cell>_cell; out="h": the other states' gradient is None."""
    cell = cells.get(name)
    t = leaf_maker(device, len(name))
    B, H = 3, 2
    leaves = [t(B, cell.gates * H, sc=1.0), t(B, cell.gates * H, sc=1.0), *[t(B, H) for _ in range(cell.states)]]

    def fn(xg, hg, *states):
        new = ops.step(name, xg, hg, states)
        return new if out == "all" else new[:1]

    check(fn, leaves)


LAYERS = {"LSTM": rnnext.LSTM, "GRU": rnnext.GRU, "RNN": rnnext.RNN}


def flat(out):
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat(o)]
    return [out]


def model_fn(model, backend, packing=None, states=0):
    """fn(x, *hx, *parameters) -> model(x, hx)'s outputs, a flat list, on backend; hx: the first states tensors
    after x (a cell's h, or h and c), else None; packing: a PackedSequence whose data x replaces (a PackedSequence
    is no tensor to differentiate)."""
    names = [n for n, _ in model.named_parameters()]

    def fn(x, *rest):
        inp = x if packing is None else packing._replace(data=x)
        hx = None if not states else rest[0] if states == 1 else tuple(rest[:states])
        with rnnext.use_backend(backend):
            return flat(torch.func.functional_call(model, dict(zip(names, rest[states:])), (inp, hx)))

    return fn


def packed_input(device, T=3, B=3, I=2, seed=7):
    """The data (a leaf) and packing of a batch with lengths T, 1, 2 (unsorted)."""
    x = pack_padded_sequence(leaf_maker(device, seed)(T, B, I), torch.tensor([T, 1, 2][:B]), enforce_sorted=False)
    return x.data.detach().requires_grad_(), x


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layers(device, kind):
    """Two layers, both directions (the reverse one flips x within the lengths before its op), packed input:
    gradgradcheck in fast mode (one random projection of the second derivatives: the full Jacobian of ~250
    values would take minutes)."""
    torch.manual_seed(11)
    model = LAYERS[kind](2, 2, num_layers=2, bidirectional=True, device=device, dtype=torch.float64)
    x, packing = packed_input(device)
    check(model_fn(model, "fused", packing), [x, *model.parameters()], fast=True)


MODELS = {
    "LSTM": lambda: rnnext.LSTM(2, 3, num_layers=2, bidirectional=True, zoneout=0.3),
    "LSTM_proj": lambda: rnnext.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2),
    "GRU": lambda: rnnext.GRU(2, 3, num_layers=2, bidirectional=True, zoneout=0.3),
    "RNN_relu": lambda: rnnext.RNN(2, 3, num_layers=2, bidirectional=True, nonlinearity="relu", bias=False),
    "MinimalGRU": lambda: rnnext.MinimalGRU(2, 3, num_layers=2, bidirectional=True),
    "LayerNormLSTM": lambda: rnnext.LayerNormLSTM(2, 3, num_layers=2, bidirectional=True, eps=1e-3, zoneout=0.3),
    "LayerNormGRU": lambda: rnnext.LayerNormGRU(2, 3, num_layers=2, bidirectional=True, eps=1e-3),
    "LSTMCell": lambda: rnnext.LSTMCell(2, 3, zoneout=0.3),
    "GRUCell": lambda: rnnext.GRUCell(2, 3, zoneout=0.3),
    "RNNCell": lambda: rnnext.RNNCell(2, 3),
    "MinimalGRUCell": lambda: rnnext.MinimalGRUCell(2, 3),
    "LayerNormLSTMCell": lambda: rnnext.LayerNormLSTMCell(2, 3, eps=1e-3, zoneout=0.3),
    "LayerNormGRUCell": lambda: rnnext.LayerNormGRUCell(2, 3, zoneout=0.3),
}


def second_derivatives(fn, leaves):
    """The first-order gradients of a random projection of fn's outputs, then the gradients of their squared
    norm (a gradient penalty), w.r.t. leaves."""
    torch.manual_seed(2)  # the same zoneout masks on both backends
    outs = fn(*leaves)
    g = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in outs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    return [*first, *torch.autograd.grad(sum(f.square().sum() for f in first), leaves)]


ZONED = {"LSTM", "GRU", "LayerNormLSTM", "LSTMCell", "GRUCell", "LayerNormLSTMCell", "LayerNormGRUCell"}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind,train", [(k, t) for k in MODELS for t in ([False, True] if k in ZONED else [False])])
def test_fused_matches_reference(device, kind, train):
    """Second derivatives through the layers (packed input with lengths) and cells, fused vs
    rnnext.use_backend("reference"); train: zoneout's masks, else its eval constant (the models in ZONED). No
    clipping: the reference backend's own second derivatives through its clipping hook are not the derivative of
    the clipped first order (see test_seq_op)."""
    torch.manual_seed(12)
    model = MODELS[kind]().to(device, torch.float64).train(train)
    t = leaf_maker(device, 13)
    hx, packing = [], None
    if kind.endswith("Cell"):  # given states: with h = 0, w_hh's gradient is 0
        x, hx = t(3, 2), [t(3, 3) for _ in range(2 if "LSTM" in kind else 1)]
    else:
        x, packing = packed_input(device, T=4)
    leaves = [x, *hx, *model.parameters()]
    got = second_derivatives(model_fn(model, "fused", packing, len(hx)), leaves)
    want = second_derivatives(model_fn(model, "reference", packing, len(hx)), leaves)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.abs().max() > 0, k
        close(a, b, 1e-9)
