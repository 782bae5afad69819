"""rnnext vs FlashRNN's pure-PyTorch "vanilla" cells: code no one here wrote (NX-AI/flashrnn, PyPI flashrnn
1.0.8: flashrnn/flashrnn/vanilla/{lstm,gru,elman,slstm}.py, run by ``flashrnn_forward`` in its __init__.py),
given rnnext's weights through the adapters below. Outputs, final states and the gradients of a random
projection of them w.r.t. x, the initial states and every parameter, float64, 1e-10 per tensor.

FlashRNN's vanilla layouts (``flashrnn_forward`` and FlashRNNConfig's internal shapes for the "vanilla" backend:
input TBGHD, recurrent HPGD, bias GHD, output TBSHD); NH heads of D units, H = NH*D, h's unit hd*D + i is [hd, i]:

- Wx ``[T, B, G_w, NH, D]``: the input projections, precomputed by the caller (FlashRNN has no W_ih);
- R ``[NH, D_prev, G_r, D]``: Ry[b, g, hd, i] = sum_j h[b, hd, j] R[hd, j, g, i], one block per head;
- b ``[G_t, NH, D]``, one bias per gate (not ``[NH, G, D]`` as the docstring says: the cells add b[None] to
  ``[B, G, NH, D]``);
- states ``[1, B, S, NH, D]`` in; out every step's ``[T, B, S, NH, D]`` and the last ``[1, B, S, NH, D]``;
  S = (h, c) for the LSTM, (h,) for the GRU and Elman, (h, c, n, m) for the sLSTM; dtype: Wx's.

The adapters (``to_flashrnn``, ``flashrnn_layer``), per layer-direction of rnnext's (torch.nn's) parameters,
weight_hh compact ``[G*H, D]`` (D = H with one head: today's dense weight_hh):

- Wx = x W_ih^T viewed ``[T, B, G, NH, D]``: rnnext's rows g*H + hd*D + i are gate g, head hd, unit i;
- R[hd, j, g, i] = weight_hh[g*H + hd*D + i, j], i.e. weight_hh.view(G, NH, D, D).permute(1, 3, 0, 2);
- LSTM and sLSTM: gates (i, f, g/z, o) in both, b = b_ih + b_hh viewed ``[4, NH, D]``; Elman: one gate,
  b = b_ih + b_hh (FlashRNN's Elman is tanh);
- GRU: FlashRNN's Wx has torch.nn's 3 input gates (r, z, n) as they are; its R has 3 gates (g, r, z), g being
  the recurrent part of n: R's gates are weight_hh's (n, r, z) blocks; b has 4 gates (g, r, z, n) =
  (b_hn, b_ir + b_hr, b_iz + b_hz, b_in), so that n = tanh(W_in x + b_in + r*(W_hn h + b_hn)) as in torch.nn;
- states: rnnext's h0 (c0, n0, m0) ``[B, H]`` stacked at dim 2 and viewed ``[1, B, S, NH, D]``; out, state 0
  (h) of every step reshaped ``[T, B, H]`` is the output, the last step's states the final ones;
- layers and directions composed the torch.nn way (``composed``): the backward direction on the time-reversed
  sequence, the directions concatenated as the next layer's input; batch_first transposed around it.

The adapters are proven here without anything new in rnnext: LSTM/GRU/Elman vs torch.nn with the same weights,
heads vs torch.nn whose weight_hh is the dense block-diagonal expansion of the compact one, and FlashRNN's sLSTM
vs a per-step transcription of the equations rnnext.sLSTM states (``slstm_transcribed``). FlashRNN's sLSTM
differs from those equations only where this file never asks it to matter: it takes m = i~ only when ALL of n
(every batch row and head) is 0, clamps n >= 1 (torch.maximum, half the gradient at n == 1), and its gradients
w.r.t. c0 and n0 at the empty state are f*(...) for an f the equations set to 0: with zero c0, n0, m0 its
outputs and the gradients w.r.t. everything else are the equations'; rnnext's c0/n0 gradients are compared with
the transcription.

The tests of rnnext's ``num_heads`` and ``rnnext.sLSTM``/``sLSTMCell`` are in the last section.
"""
import importlib.util
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnnext
from rnnext import ops
from conftest import close, cpu_and_cuda

f64 = torch.float64
RTOL = 1e-10
BACKENDS = [pytest.param("fused", marks=pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="extension not built")),
            "reference"]
GATES = {"lstm": 4, "gru": 3, "elman": 1, "slstm": 4}
STATES = {"lstm": ("h", "c"), "gru": ("h",), "elman": ("h",), "slstm": ("h", "c", "n", "m")}
TORCH_NN = {"lstm": nn.LSTM, "gru": nn.GRU, "elman": nn.RNN}
KINDS = ["lstm", "gru", "elman"]


@pytest.fixture(scope="session")
def vanilla():
    """flashrnn.flashrnn.vanilla, loaded from its files as a package of its own: importing it through flashrnn
    runs flashrnn/__init__.py, which imports the CUDA loader (torch.utils.cpp_extension, the kernels' sources,
    gpu_info); the vanilla package imports only torch and its own modules."""
    spec = importlib.util.find_spec("flashrnn")  # locates the package without running its __init__
    if spec is None:
        raise ImportError("flashrnn is not installed: pip install flashrnn einops (requirements.txt)")
    root = Path(next(iter(spec.submodule_search_locations))) / "flashrnn" / "vanilla"
    name = "_flashrnn_vanilla"
    if name not in sys.modules:
        vspec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                       submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(vspec)
        sys.modules[name] = module  # its relative imports (.lstm, .slstm, ...) look the package up there
        try:
            vspec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


# ---- the adapters: rnnext's parameters and states -> FlashRNN's, FlashRNN's outputs -> rnnext's ----------------

def to_flashrnn(kind, w_ih, w_hh, b_ih, b_hh, num_heads):
    """One layer-direction's rnnext parameters -> FlashRNN's (W, R, b): W ``[G_w*H, I]`` (Wx = x W^T),
    R ``[NH, D, G_r, D]``, b ``[G_t, NH, D]``; weight_hh compact ``[G*H, D]``."""
    G = GATES[kind]
    H = w_hh.shape[0] // G
    NH, D = num_heads, H // num_heads
    assert w_hh.shape == (G * H, D), (w_hh.shape, G, H, D)
    blocks = w_hh.view(G, NH, D, D)  # [gate, head, unit i, unit j of h's head]
    if kind == "gru":
        blocks = blocks[[2, 0, 1]]  # torch.nn's (r, z, n) -> FlashRNN's (g, r, z), g = W_hn h
    R = blocks.permute(1, 3, 0, 2)
    zero = w_hh.new_zeros(G * H)
    bi = (zero if b_ih is None else b_ih).view(G, NH, D)
    bh = (zero if b_hh is None else b_hh).view(G, NH, D)
    if kind == "gru":
        b = torch.stack([bh[2], bi[0] + bh[0], bi[1] + bh[1], bi[2]])  # (g, r, z, n)
    else:
        b = bi + bh
    return w_ih, R, b


def flashrnn_layer(vanilla, kind, num_heads, x, states0, params):
    """FlashRNN's vanilla cell over one layer-direction: x ``[T, B, I]``, states0 a tuple of ``[B, H]``,
    params (w_ih, w_hh, b_ih, b_hh) -> (y ``[T, B, H]``, final states, a tuple of ``[B, H]``)."""
    W, R, b = to_flashrnn(kind, *params, num_heads)
    T, B = x.shape[:2]
    NH, D = R.shape[0], R.shape[3]
    S = len(STATES[kind])
    assert len(states0) == S
    Wx = (x @ W.T).view(T, B, -1, NH, D)
    s0 = torch.stack(states0, 1).view(1, B, S, NH, D)
    every, last = vanilla.flashrnn_forward(Wx, s0, R, b, vanilla.flashrnn_pointwise_function_registry[kind])
    assert every.shape == (T, B, S, NH, D) and last.shape == (1, B, S, NH, D)
    return every[:, :, 0].reshape(T, B, NH * D), tuple(last[0, :, s].reshape(B, NH * D) for s in range(S))


def layer_params(P, l, d):
    sfx = f"_l{l}" + ("_reverse" if d else "")
    return tuple(P.get(n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def composed(cell, x, hx, P, layers, dirs, batch_first):
    """cell(x [T, B, I], states0, params) -> (y, finals) of one layer-direction, composed over layers and
    directions as torch.nn does: x rnnext's input; hx a tuple of ``[L*dirs, B, H]``; P rnnext's parameters by
    name. Returns (output, a tuple of final states ``[L*dirs, B, H]``), rnnext's layout."""
    inp = x.transpose(0, 1) if batch_first else x
    finals = [[] for _ in hx]
    for l in range(layers):
        outs = []
        for d in range(dirs):
            k = l * dirs + d
            y, last = cell(inp.flip(0) if d else inp, tuple(s[k] for s in hx), layer_params(P, l, d))
            outs.append(y.flip(0) if d else y)
            for f, s in zip(finals, last):
                f.append(s)
        inp = torch.cat(outs, -1)
    return inp.transpose(0, 1) if batch_first else inp, tuple(torch.stack(f) for f in finals)


# ---- independent references: torch.nn with dense block-diagonal weights, the sLSTM equations -------------------

def dense_hh(w_hh, G, num_heads):
    """The dense ``[G*H, H]`` recurrent weight of a compact ``[G*H, D]`` one: dense[g*H + hd*D + i, hd*D + j] =
    compact[g*H + hd*D + i, j], zero off the heads' diagonal blocks (differentiable in compact)."""
    H = w_hh.shape[0] // G
    NH, D = num_heads, H // num_heads
    eye = torch.eye(NH, dtype=w_hh.dtype, device=w_hh.device)
    return torch.einsum("gaij,ab->gaibj", w_hh.view(G, NH, D, D), eye).reshape(G * H, H)


def slstm_transcribed(num_heads, x, states0, params):
    """rnnext.sLSTM's equations, one layer-direction, a plain loop over steps: raw = W_ih x + b_ih + b_hh +
    R h_prev, split (i~, f~, z~, o~); lf = logsigmoid(f~); where n_prev == 0 (elementwise): m = i~, f = 0; else
    m = max(i~, lf + m_prev) (ties to i~), f = exp(lf + m_prev - m); i = exp(i~ - m); c = f c_prev + i tanh(z~);
    n = f n_prev + i; h = sigmoid(o~) c / n."""
    w_ih, w_hh, b_ih, b_hh = params
    R = dense_hh(w_hh, 4, num_heads)
    h, c, n, m = states0
    ys = []
    for xt in x:
        raw = xt @ w_ih.T + h @ R.T
        if b_ih is not None:
            raw = raw + b_ih + b_hh
        i_raw, f_raw, z_raw, o_raw = raw.chunk(4, -1)
        lfm = F.logsigmoid(f_raw) + m
        empty = n == 0
        m_new = torch.where(empty | (i_raw >= lfm), i_raw, lfm)
        f = torch.where(empty, 0.0, torch.exp(torch.where(empty, 0.0, lfm - m_new)))
        i = torch.exp(i_raw - m_new)
        c = f * c + i * torch.tanh(z_raw)
        n = f * n + i
        m = m_new
        h = torch.sigmoid(o_raw) * c / n
        ys.append(h)
    return torch.stack(ys), (h, c, n, m)


# ---- test helpers ------------------------------------------------------------------------------------------

@dataclass
class Case:
    T: int
    B: int
    I: int
    H: int
    k: int = 1  # heads
    layers: int = 1
    bidir: bool = False
    bias: bool = True
    batch_first: bool = False
    hx: bool = True  # given (else None: zeros)

    @property
    def dirs(self):
        return 2 if self.bidir else 1

    def layer_kw(self):
        return dict(num_layers=self.layers, bias=self.bias, batch_first=self.batch_first,
                    bidirectional=self.bidir, dtype=f64)


def randn(g, device, *shape, scale=0.5):
    return (torch.randn(*shape, generator=g, dtype=f64) * scale).to(device).requires_grad_()


def make_params(g, kind, c, device):
    """torch.nn's parameter names and shapes, weight_hh compact ``[G*H, H//k]``, random leaves."""
    G, P = GATES[kind], {}
    for l in range(c.layers):
        for d in range(c.dirs):
            sfx = f"_l{l}" + ("_reverse" if d else "")
            P["weight_ih" + sfx] = randn(g, device, G * c.H, c.I if l == 0 else c.dirs * c.H)
            P["weight_hh" + sfx] = randn(g, device, G * c.H, c.H // c.k)
            if c.bias:
                P["bias_ih" + sfx] = randn(g, device, G * c.H)
                P["bias_hh" + sfx] = randn(g, device, G * c.H)
    return P


def make_inputs(g, kind, c, device, zero_states=()):
    """x in rnnext's layout and the initial states ``[L*dirs, B, H]`` (leaves; those named in zero_states
    zeros), or () when the case gives no hx."""
    x = randn(g, device, *((c.B, c.T) if c.batch_first else (c.T, c.B)), c.I, scale=1.0)
    if not c.hx:
        return x, ()
    shape = (c.layers * c.dirs, c.B, c.H)
    return x, tuple(torch.zeros(shape, dtype=f64, device=device).requires_grad_() if s in zero_states
                    else randn(g, device, *shape) for s in STATES[kind])


def zeros_like_states(kind, x, c):
    return tuple(x.new_zeros(c.layers * c.dirs, c.B, c.H) for _ in STATES[kind])


def project(outs, seed=3):
    """A random projection of the outputs (the same for both sides of a comparison)."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=f64).to(o)).sum() for o in outs)


def outs_and_grads(outs, wrt):
    return list(outs) + list(torch.autograd.grad(project(outs), wrt))


def labels(kind, states_given, P):
    return (["output"] + [s + "_n" for s in STATES[kind]] + ["grad x"]
            + [f"grad {s}0" for s in (STATES[kind] if states_given else ())] + [f"grad {n}" for n in P])


def check(got, want, what):
    assert len(got) == len(want) == len(what), (len(got), len(want), len(what))
    for a, b, name in zip(got, want, what):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        try:
            close(a, b, RTOL)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def hx_arg(states):
    """rnnext's hx of a tuple of states: LSTM and sLSTM a tuple, GRU and RNN h0 alone; None for ()."""
    if not states:
        return None
    return states if len(states) > 1 else states[0]


def as_tuple(hidden):
    return tuple(hidden) if isinstance(hidden, tuple) else (hidden,)


def load(model, P):
    """P's values into the model's parameters; the names must be the same sets."""
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(P), (names, list(P))
    with torch.no_grad():
        for n, p in model.named_parameters():
            assert p.shape == P[n].shape, (n, p.shape, P[n].shape)
            p.copy_(P[n])
    return dict(model.named_parameters())


def run_rnnext(model, P, x, states, backend):
    """rnnext's outputs and gradients, in the order of labels(): w.r.t. x, the states given, P's names."""
    params = load(model, P)
    with rnnext.use_backend(backend):
        out, hidden = model(x, hx_arg(states))
    return outs_and_grads([out, *as_tuple(hidden)], [x, *states, *(params[n] for n in P)])


def run_flashrnn(vanilla, kind, c, P, x, states):
    cell = partial(flashrnn_layer, vanilla, kind, c.k)
    out, finals = composed(cell, x, states or zeros_like_states(kind, x, c), P, c.layers, c.dirs, c.batch_first)
    return outs_and_grads([out, *finals], [x, *states, *P.values()])


# (T, B, I, H, ...): T=1, B=1, H not a multiple of 8, no bias, no hx, layers, directions, batch_first
CASES = {
    "base": Case(5, 3, 4, 6),
    "T1_B1": Case(1, 1, 3, 5),
    "odd_H_no_hx": Case(4, 2, 5, 7, hx=False),
    "no_bias": Case(3, 2, 2, 4, bias=False),
    "deep_bidir_batch_first": Case(4, 2, 3, 3, layers=2, bidir=True, batch_first=True),
}
# heads of D = 3 and D = 1
HEAD_CASES = {
    "k2_D3": Case(4, 3, 4, 6, k=2),
    "k5_D1": Case(3, 2, 3, 5, k=5),
    "k3_D3_T1_B1": Case(1, 1, 2, 9, k=3),
    "k2_D3_deep_bidir_batch_first_no_hx": Case(3, 2, 3, 6, k=2, layers=2, bidir=True, batch_first=True, hx=False),
}
# the sLSTM's: h0 random, c0 = n0 = m0 = 0 where hx is given (FlashRNN's sLSTM is the equations' there)
STABILIZED_CASES = {
    "k1": Case(5, 3, 4, 6),
    "k1_T1_B1": Case(1, 1, 3, 5),
    "k2_D3": Case(4, 2, 3, 6, k=2),
    "k4_D1_no_hx": Case(4, 2, 3, 4, k=4, hx=False),
    "k3_D1_deep_bidir_batch_first": Case(3, 2, 2, 3, k=3, layers=2, bidir=True, batch_first=True),
    "k2_D3_no_bias": Case(3, 2, 3, 6, k=2, bias=False),
}
EMPTY = ("c", "n", "m")


# ---- the adapters, proven without anything new in rnnext ---------------------------------------------------

@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_matches_torch_nn(vanilla, kind, case, device):
    """FlashRNN's LSTM/GRU/Elman through the adapters vs torch.nn.LSTM/GRU/RNN(tanh) with the same weights."""
    c = CASES[case]
    g = torch.Generator().manual_seed(len(kind) * 10 + len(case))
    P = make_params(g, kind, c, device)
    x, states = make_inputs(g, kind, c, device)
    ref = TORCH_NN[kind](c.I, c.H, **c.layer_kw()).to(device)
    out, hidden = torch.func.functional_call(ref, P, (x, hx_arg(states)), strict=True)
    want = outs_and_grads([out, *as_tuple(hidden)], [x, *states, *P.values()])
    got = run_flashrnn(vanilla, kind, c, P, x, states)
    check(got, want, labels(kind, bool(states), P))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(HEAD_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_blocks_match_dense_torch_nn(vanilla, kind, case, device):
    """FlashRNN with NH > 1 through the adapters, compact weight_hh ``[G*H, D]`` vs torch.nn whose weight_hh is
    the dense block-diagonal expansion of it (gradients w.r.t. the compact weights through the expansion):
    the layout rnnext's num_heads is to have, proven before it exists."""
    c = HEAD_CASES[case]
    g = torch.Generator().manual_seed(len(kind) * 10 + len(case) + 1)
    P = make_params(g, kind, c, device)
    x, states = make_inputs(g, kind, c, device)
    dense = {n: dense_hh(p, GATES[kind], c.k) if n.startswith("weight_hh") else p for n, p in P.items()}
    ref = TORCH_NN[kind](c.I, c.H, **c.layer_kw()).to(device)
    out, hidden = torch.func.functional_call(ref, dense, (x, hx_arg(states)), strict=True)
    want = outs_and_grads([out, *as_tuple(hidden)], [x, *states, *P.values()])
    got = run_flashrnn(vanilla, kind, c, P, x, states)
    check(got, want, labels(kind, bool(states), P))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(STABILIZED_CASES))
def test_adapter_stabilized_cell_matches_transcription(vanilla, case, device):
    """FlashRNN's sLSTM through the adapters vs slstm_transcribed (the equations rnnext.sLSTM states), h0
    random, c0 = n0 = m0 = 0: outputs, final states, gradients w.r.t. x, h0, m0 and every parameter (those
    w.r.t. c0 and n0 are FlashRNN's convention, see the module's docstring)."""
    c = STABILIZED_CASES[case]
    g = torch.Generator().manual_seed(len(case) + 2)
    P = make_params(g, "slstm", c, device)
    x, states = make_inputs(g, "slstm", c, device, zero_states=EMPTY)
    hx = states or zeros_like_states("slstm", x, c)
    out, finals = composed(partial(slstm_transcribed, c.k), x, hx, P, c.layers, c.dirs, c.batch_first)
    want = outs_and_grads([out, *finals], [x, *states, *P.values()])
    got = run_flashrnn(vanilla, "slstm", c, P, x, states)
    what = labels("slstm", bool(states), P)
    keep = [k for k, name in enumerate(what) if name not in ("grad c0", "grad n0")]
    check([got[k] for k in keep], [want[k] for k in keep], [what[k] for k in keep])


# ---- today's rnnext layers (one head) vs FlashRNN ----------------------------------------------------------

RNNEXT = {"lstm": rnnext.LSTM, "gru": rnnext.GRU, "elman": rnnext.RNN}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_flashrnn(vanilla, kind, case, backend, device):
    """rnnext.LSTM/GRU/RNN vs FlashRNN's vanilla LSTM/GRU/Elman (one head), same weights."""
    c = CASES[case]
    g = torch.Generator().manual_seed(len(kind) * 10 + len(case) + 3)
    P = make_params(g, kind, c, device)
    x, states = make_inputs(g, kind, c, device)
    model = RNNEXT[kind](c.I, c.H, **c.layer_kw()).to(device)
    got = run_rnnext(model, P, x, states, backend)
    want = run_flashrnn(vanilla, kind, c, P, x, states)
    check(got, want, labels(kind, bool(states), P))


# ---- rnnext's num_heads on the layers, rnnext.sLSTM and rnnext.sLSTMCell -------------------------------------

@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(HEAD_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_heads_layer_matches_flashrnn(vanilla, kind, case, backend, device):
    """rnnext.LSTM/GRU/RNN(num_heads=k), weight_hh ``[G*H, H//k]``, vs FlashRNN's cells with NH = k."""
    c = HEAD_CASES[case]
    g = torch.Generator().manual_seed(len(kind) * 10 + len(case) + 4)
    P = make_params(g, kind, c, device)
    x, states = make_inputs(g, kind, c, device)
    model = RNNEXT[kind](c.I, c.H, num_heads=c.k, **c.layer_kw()).to(device)
    got = run_rnnext(model, P, x, states, backend)
    want = run_flashrnn(vanilla, kind, c, P, x, states)
    check(got, want, labels(kind, bool(states), P))


@pytest.mark.parametrize("kind", KINDS)
def test_heads_one_is_todays_layer(kind):
    """num_heads=1: torch.nn's parameters and shapes, and today's layer's results with the same state_dict."""
    c = Case(3, 2, 3, 5, layers=2, bidir=True)
    model = RNNEXT[kind](c.I, c.H, num_heads=1, **c.layer_kw())
    today = RNNEXT[kind](c.I, c.H, **c.layer_kw())
    shapes = {n: p.shape for n, p in TORCH_NN[kind](c.I, c.H, **c.layer_kw()).named_parameters()}
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    today.load_state_dict(model.state_dict())
    x = torch.randn(c.T, c.B, c.I, generator=torch.Generator().manual_seed(5), dtype=f64)
    for a, b in zip(model(x), today(x)):
        for u, v in zip(as_tuple(a), as_tuple(b)):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def new_slstm(c, device, dtype=f64):
    kw = c.layer_kw() | dict(dtype=dtype)
    return rnnext.sLSTM(c.I, c.H, num_heads=c.k, **kw).to(device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(STABILIZED_CASES))
def test_slstm_layer_matches_flashrnn(vanilla, case, backend, device):
    """rnnext.sLSTM vs FlashRNN's vanilla sLSTM, h0 random and c0 = n0 = m0 = 0 (or no hx): outputs,
    (h_n, c_n, n_n, m_n), gradients w.r.t. x, h0, m0 and every parameter; those w.r.t. c0 and n0 (0: f = 0 at
    the empty state) vs the transcription."""
    c = STABILIZED_CASES[case]
    g = torch.Generator().manual_seed(len(case) + 6)
    P = make_params(g, "slstm", c, device)
    x, states = make_inputs(g, "slstm", c, device, zero_states=EMPTY)
    got = run_rnnext(new_slstm(c, device), P, x, states, backend)
    want = run_flashrnn(vanilla, "slstm", c, P, x, states)
    what = labels("slstm", bool(states), P)
    if states:
        out, finals = composed(partial(slstm_transcribed, c.k), x, states, P, c.layers, c.dirs, c.batch_first)
        transcribed = outs_and_grads([out, *finals], [x, *states, *P.values()])
        for s in ("grad c0", "grad n0"):
            want[what.index(s)] = transcribed[what.index(s)]
    check(got, want, what)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["k1", "k2_D3", "k3_D1_deep_bidir_batch_first"])
def test_slstm_layer_matches_transcription_with_states(case, backend, device):
    """rnnext.sLSTM vs slstm_transcribed from states FlashRNN does not take: c0, m0 random, n0 positive with
    some elements 0 (empty: m = i~, f = 0 there, per element, whatever c0 and m0 hold), the rest of the
    equations as they are."""
    c = STABILIZED_CASES[case]
    g = torch.Generator().manual_seed(len(case) + 7)
    P = make_params(g, "slstm", c, device)
    x, (h0, c0, n0, m0) = make_inputs(g, "slstm", c, device)
    with torch.no_grad():
        n0.abs_().add_(0.1)
        n0[..., ::3] = 0.0
        # m_prev = 4 there: m = max(i~, lf + m_prev) would differ from i~, seen in (c_n, n_n, m_n) (h is the same
        # under the stabilizer's shift of c, n and m)
        m0[..., ::3] = 4.0
    states = (h0, c0, n0, m0)
    got = run_rnnext(new_slstm(c, device), P, x, states, backend)
    out, finals = composed(partial(slstm_transcribed, c.k), x, states, P, c.layers, c.dirs, c.batch_first)
    want = outs_and_grads([out, *finals], [x, *states, *P.values()])
    check(got, want, labels("slstm", True, P))


def extreme_inputs(device, dtype, small_n, size):
    """i~ of +-size alternating over steps (W_ih's i rows carry size*x[0], x[0] = +-1), two heads; zero states,
    or (small_n) n0 = 1e-6, c0 of n0's order, h0 and m0 random."""
    c = Case(6, 2, 2, 4, k=2)
    g = torch.Generator().manual_seed(8)
    P = make_params(g, "slstm", c, "cpu")
    x, states = make_inputs(g, "slstm", c, "cpu")
    with torch.no_grad():
        P["weight_ih_l0"][:c.H, 0] = size
        # small_n: -80 first, so that n stays near n0 for a step (i ~ exp(-80 - m0), f = 1)
        x[:, :, 0] = torch.tensor([-1.0, 1.0] if small_n else [1.0, -1.0]).repeat(c.T // 2)[:, None]
        if small_n:
            states[1].mul_(1e-6)
            states[2].fill_(1e-6)
        else:
            for s in states[1:]:
                s.zero_()
    def leaf(t):
        return t.detach().to(device, dtype).requires_grad_()

    return c, {n: leaf(p) for n, p in P.items()}, leaf(x), tuple(leaf(s) for s in states)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("small_n", [False, True], ids=["zero_states", "small_n0"])
@pytest.mark.parametrize("size", [80.0, 90.0], ids=["i80", "i90"])
def test_slstm_float32_extremes(vanilla, size, small_n, backend, device):
    """rnnext.sLSTM in float32 with i~ = +-80 and +-90 (exp(90) overflows float32, exp(-90) is subnormal: the
    stabilizer m must carry them), n0 small or zero states: every output and gradient finite, and near
    float64's: the transcription's forward and gradients, FlashRNN's forward (zero states; its n >= 1 clamp
    halves gradients at n == 1, which these inputs reach)."""
    c, P64, x64, s64 = extreme_inputs(device, f64, small_n, size)
    _, P32, x32, s32 = extreme_inputs(device, torch.float32, small_n, size)
    model = new_slstm(c, device, dtype=torch.float32)
    params = load(model, P32)
    with rnnext.use_backend(backend):
        out, hidden = model(x32, s32)
    got = outs_and_grads([out, *hidden], [x32, *s32, *(params[n] for n in P32)])
    out, finals = composed(partial(slstm_transcribed, c.k), x64, s64, P64, c.layers, c.dirs, c.batch_first)
    want = outs_and_grads([out, *finals], [x64, *s64, *P64.values()])
    what = labels("slstm", True, P32)
    assert max(abs(m.item()) for m in want[what.index("m_n")].flatten()) > 50  # the stabilizer carries i~'s size
    for a, b, name in zip(got, want, what):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        try:
            close(a, b, 1e-4)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    if not small_n:
        cell = partial(flashrnn_layer, vanilla, "slstm", c.k)
        out, finals = composed(cell, x64, s64, P64, c.layers, c.dirs, c.batch_first)
        for a, b, name in zip(got, [out, *finals], what):
            try:
                close(a, b, 1e-4)
            except AssertionError as e:
                raise AssertionError(f"{name} vs FlashRNN: {e}") from None


@pytest.mark.parametrize("k", [1, 3])
def test_slstm_parameters_and_shapes(k):
    """rnnext.sLSTM's parameters (torch.nn's names; weight_hh ``[4H, H//k]``), its default hx (zeros) and the
    shapes it returns: output ``[T, B, dirs*H]``, (h_n, c_n, n_n, m_n) each ``[L*dirs, B, H]``."""
    c = Case(3, 2, 4, 6, k=k, layers=2, bidir=True, hx=False)
    model = new_slstm(c, "cpu")
    G, D = 4 * c.H, c.H // k
    want = {}
    for l in range(2):
        for sfx in (f"_l{l}", f"_l{l}_reverse"):
            want |= {"weight_ih" + sfx: (G, c.I if l == 0 else 2 * c.H), "weight_hh" + sfx: (G, D),
                     "bias_ih" + sfx: (G,), "bias_hh" + sfx: (G,)}
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == want
    x = torch.randn(c.T, c.B, c.I, dtype=f64)
    out, hidden = model(x)
    assert out.shape == (c.T, c.B, 2 * c.H) and len(hidden) == 4
    assert all(s.shape == (4, c.B, c.H) for s in hidden)
    out0, hidden0 = model(x, tuple(torch.zeros(4, c.B, c.H, dtype=f64) for _ in range(4)))
    torch.testing.assert_close(out, out0, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["no_hx", "batched", "unbatched"])
def test_slstm_cell_is_one_step(vanilla, mode, backend, device):
    """rnnext.sLSTMCell(num_heads=2) vs one step: of FlashRNN's sLSTM from zero states (no_hx), of the
    transcription from random states, n0 with an empty element (batched, unbatched [I] and [H])."""
    B, I, H, k = 3, 4, 6, 2
    g = torch.Generator().manual_seed(9 + len(mode))
    cell = rnnext.sLSTMCell(I, H, bias=True, num_heads=k, dtype=f64).to(device)
    P = {n + "_l0": randn(g, device, *p.shape) for n, p in cell.named_parameters()}
    params = dict(cell.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(P[n + "_l0"])
    x = randn(g, device, B, I, scale=1.0)
    states = tuple(randn(g, device, B, H) for _ in range(4))
    with torch.no_grad():
        states[2].abs_().add_(0.1)
        states[2][0, 1] = 0.0
    rows = slice(0, 1) if mode == "unbatched" else slice(None)
    with rnnext.use_backend(backend):
        if mode == "no_hx":
            got_states = cell(x)
        elif mode == "batched":
            got_states = cell(x, states)
        else:
            got_states = tuple(s[None] for s in cell(x[0], tuple(s[0] for s in states)))
    leaves = [x] + ([] if mode == "no_hx" else list(states))
    got = outs_and_grads(got_states, leaves + [params[n[:-3]] for n in P])
    weights = layer_params(P, 0, 0)
    if mode == "no_hx":
        _, last = flashrnn_layer(vanilla, "slstm", k, x[None], tuple(x.new_zeros(B, H) for _ in range(4)), weights)
    else:
        _, last = slstm_transcribed(k, x[None, rows], tuple(s[rows] for s in states), weights)
    want = outs_and_grads(last, leaves + list(P.values()))
    what = [s + "'" for s in STATES["slstm"]] + ["grad x"] + [f"grad {s}0" for s in STATES["slstm"] if leaves[1:]] \
        + [f"grad {n[:-3]}" for n in P]
    check(got, want, what)
