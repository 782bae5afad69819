"""The layers against code no one here wrote, transcribed from its source with its own parameter layout:

- LayerNormGRU vs Haste's ``LayerNormGRUScript`` (lmnt-com/haste at ceba32e,
  frameworks/pytorch/layer_norm_gru.py), parameters mapped as the README states;
- LayerNormLSTM vs torchaudio's ``_CustomLSTM(layer_norm=True)`` (pytorch/audio, torchaudio/models/rnnt.py);
- zoneout on LSTM, GRU, LayerNormLSTM vs ESPnet's ``ZoneOutCell`` (espnet/nets/pytorch_backend/tacotron2/
  decoder.py) around ``nn.LSTMCell``/``nn.GRUCell``/the torchaudio step; LayerNormGRU's zoneout is Haste's own.

Those libraries run one layer, one direction, whole sequences; the options torch.nn adds (layers,
directions, variable lengths, hx) are composed here the plain way: each sequence on its own over its own
length, reversed for the backward direction, the directions concatenated as the next layer's input.
Training-mode zoneout: ``rnnext.functional.keep_mask`` is replaced by draws recorded here, which the
transcriptions then use. Every output, final state and gradient is compared in float64 at 1e-10.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnext
from rnnext import functional, ops
from conftest import RecordedMasks, close

BACKENDS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(ops.LOAD_ERROR is not None,
                                                                          reason="extension not built"))]
f64 = torch.float64


# ---- the transcriptions -------------------------------------------------------------------------------

def haste_layer_norm_gru(training, zoneout_prob, input, h0, kernel, recurrent_kernel, bias, recurrent_bias, gamma,
                         zoneout_mask):
    """Haste's LayerNormGRUScript: kernel [I, 3H], recurrent_kernel [H, 3H], gate columns (z, r, h); the norms
    have no beta, F.layer_norm's eps (1e-5; its CUDA kernel hard-codes the same); the biases come after them.
    h = z*h' + (1-z)*g. zoneout_mask: 1 = take the new value (Haste draws it with bernoulli_(1 - zoneout)).
    Returns the states [T+1, B, H], h0 first."""
    time_steps = input.shape[0]
    hidden_size = recurrent_kernel.shape[0]
    h = [h0]
    Wx = F.layer_norm(input @ kernel, (hidden_size * 3,), weight=gamma[0]) + bias
    for t in range(time_steps):
        Rh = F.layer_norm(h[t] @ recurrent_kernel, (hidden_size * 3,), weight=gamma[1]) + recurrent_bias
        vx = torch.chunk(Wx[t], 3, 1)
        vh = torch.chunk(Rh, 3, 1)
        z = torch.sigmoid(vx[0] + vh[0])
        r = torch.sigmoid(vx[1] + vh[1])
        g = torch.tanh(vx[2] + r * vh[2])
        h.append(z * h[t] + (1 - z) * g)
        if zoneout_prob:
            if training:
                h[-1] = (h[-1] - h[-2]) * zoneout_mask[t] + h[-2]
            else:
                h[-1] = zoneout_prob * h[-2] + (1 - zoneout_prob) * h[-1]
    return torch.stack(h)


class TorchaudioLSTM(nn.Module):
    """torchaudio's _CustomLSTM with layer_norm=True: x2g and p2g without bias, LayerNorm over the 4H gates
    (g_norm) and over the cell state (c_norm), gates (i, f, g, o), the normalised c carried. bias=True gives
    both Linears a bias (not in torchaudio: rnnext's bias=True)."""

    def __init__(self, input_dim, hidden_dim, layer_norm_epsilon=1e-5, bias=False):
        super().__init__()
        self.x2g = nn.Linear(input_dim, 4 * hidden_dim, bias=bias, dtype=f64)
        self.p2g = nn.Linear(hidden_dim, 4 * hidden_dim, bias=bias, dtype=f64)
        self.c_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_epsilon, dtype=f64)
        self.g_norm = nn.LayerNorm(4 * hidden_dim, eps=layer_norm_epsilon, dtype=f64)
        self.hidden_dim = hidden_dim

    def forward(self, input, state):
        h, c = state
        gated_input = self.x2g(input)
        outputs = []
        for gates in gated_input.unbind(0):
            gates = gates + self.p2g(h)
            gates = self.g_norm(gates)
            input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, 1)
            input_gate = input_gate.sigmoid()
            forget_gate = forget_gate.sigmoid()
            cell_gate = cell_gate.tanh()
            output_gate = output_gate.sigmoid()
            c = forget_gate * c + input_gate * cell_gate
            c = self.c_norm(c)
            h = output_gate * c.tanh()
            outputs.append(h)
        return torch.stack(outputs, dim=0), [h, c]


class ZoneOutCell(nn.Module):
    """ESPnet's ZoneOutCell: zoneout applied to each part of the cell's state (LSTM: h, then c) with the same
    probability; mask 1 = keep the previous value. ESPnet draws each mask with bernoulli_(prob); here they
    come from ``masks``, in the order ESPnet draws them."""

    def __init__(self, cell, zoneout_prob, masks):
        super().__init__()
        self.cell = cell
        self.zoneout_prob = zoneout_prob
        self.masks = masks

    def forward(self, inputs, hidden):
        next_hidden = self.cell(inputs, hidden)
        return self._zoneout(hidden, next_hidden, self.zoneout_prob)

    def _zoneout(self, h, next_h, prob):
        if isinstance(h, tuple):
            num_h = len(h)
            if not isinstance(prob, tuple):
                prob = tuple([prob] * num_h)
            return tuple([self._zoneout(h[i], next_h[i], prob[i]) for i in range(num_h)])
        if self.training:
            mask = next(self.masks)
            return mask * h + (1 - mask) * next_h
        return prob * h + (1 - prob) * next_h


def zrh_to_rzn(t):
    """Haste's gate blocks (z, r, h) along dim 0 -> torch.nn's (r, z, n)."""
    z, r, h = t.chunk(3, 0)
    return torch.cat([r, z, h], 0)


# ---- each library's own parameters, and the map onto rnnext's ----------------------------------------------

def randn(g, *shape, scale=0.5):
    return (torch.randn(*shape, generator=g, dtype=f64) * scale).requires_grad_()


class Haste:
    """Haste's tensors per layer-direction, in its layout; MAP, the README's claim: Haste's model equals
    rnnext.LayerNormGRU(bias=False) with W_ih = kernel^T, W_hh = recurrent_kernel^T, ln_input_weight = gamma[0],
    ln_input_bias = bias, ln_hidden_weight = gamma[1], ln_hidden_bias = recurrent_bias, rows (z, r, h) -> (r, z, n)."""
    cls, cell_cls, states, eps = rnnext.LayerNormGRU, rnnext.LayerNormGRUCell, 1, 1e-5
    # rnnext parameter stem: (Haste tensor, Haste value -> rnnext value)
    MAP = {"weight_ih": ("kernel", lambda t: zrh_to_rzn(t.t())),
           "weight_hh": ("recurrent_kernel", lambda t: zrh_to_rzn(t.t())),
           "ln_input_weight": ("gamma", lambda t: zrh_to_rzn(t[0])),
           "ln_input_bias": ("bias", zrh_to_rzn),
           "ln_hidden_weight": ("gamma", lambda t: zrh_to_rzn(t[1])),
           "ln_hidden_bias": ("recurrent_bias", zrh_to_rzn)}

    def __init__(self, g, sizes, H, bias):
        assert not bias, "Haste's formulation has no bias inside the norms"
        self.params = [dict(kernel=randn(g, I, 3 * H), recurrent_kernel=randn(g, H, 3 * H), bias=randn(g, 3 * H),
                            recurrent_bias=randn(g, 3 * H), gamma=(1 + randn(g, 2, 3 * H, scale=0.3)).detach()
                            .requires_grad_()) for I in sizes]

    def tensors(self, k):
        return self.params[k]

    def run(self, k, xs, state, keep, training, p):
        """One sequence xs [n, 1, I]; keep [n, 1, H] rnnext's keep mask (or None)."""
        haste_mask = xs.new_empty(0, 0, 0) if keep is None else 1 - keep  # rnnext keeps where Haste takes new
        h = haste_layer_norm_gru(training, p, xs, state[0], **self.params[k], zoneout_mask=haste_mask)
        return h[1:], (h[-1],)


class Torchaudio:
    """A TorchaudioLSTM per layer-direction; MAP, the README's claim: torchaudio's model equals
    rnnext.LayerNormLSTM(bias=False) with W_ih = x2g.weight, W_hh = p2g.weight, ln_gates_* = g_norm's weight and
    bias, ln_cell_* = c_norm's (same gate order). Zoneout: ESPnet's ZoneOutCell around one torchaudio step."""
    cls, cell_cls, states = rnnext.LayerNormLSTM, rnnext.LayerNormLSTMCell, 2
    MAP = {"weight_ih": ("x2g.weight", None), "weight_hh": ("p2g.weight", None), "bias_ih": ("x2g.bias", None),
           "bias_hh": ("p2g.bias", None), "ln_gates_weight": ("g_norm.weight", None),
           "ln_gates_bias": ("g_norm.bias", None), "ln_cell_weight": ("c_norm.weight", None),
           "ln_cell_bias": ("c_norm.bias", None)}

    def __init__(self, g, sizes, H, bias, eps=1e-3):  # emformer_rnnt_base's lstm_layer_norm_epsilon
        self.eps = eps
        self.mods = [TorchaudioLSTM(I, H, eps, bias) for I in sizes]
        with torch.no_grad():  # every parameter away from its initial value
            for m in self.mods:
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=f64) * 0.3)
                m.g_norm.weight.add_(1), m.c_norm.weight.add_(1)
        present = dict(self.mods[0].named_parameters())
        self.MAP = {stem: v for stem, v in self.MAP.items() if v[0] in present}

    def tensors(self, k):
        return dict(self.mods[k].named_parameters())

    def run(self, k, xs, state, keep, training, p):
        mod = self.mods[k]
        if not p:
            out, (h, c) = mod(xs, list(state))
            return out, (h, c)
        masks = iter([] if keep is None else [m for step in keep for m in step.chunk(2, 1)])
        cell = ZoneOutCell(lambda x, hc: tuple(mod(x[None], list(hc))[1]), p, masks).train(training)
        return espnet_loop(cell, xs, state)


class TorchCell:
    """The plain LSTM/GRU with zoneout: ESPnet's ZoneOutCell around nn.LSTMCell/nn.GRUCell (torch.nn's layout)."""

    def __init__(self, g, sizes, H, bias, lstm):
        cell = nn.LSTMCell if lstm else nn.GRUCell
        self.cls, self.states, self.lstm = (rnnext.LSTM, 2, True) if lstm else (rnnext.GRU, 1, False)
        self.mods = [cell(I, H, bias=bias, dtype=f64) for I in sizes]
        self.MAP = {n: (n, None) for n in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())}

    def tensors(self, k):
        return dict(self.mods[k].named_parameters())

    def run(self, k, xs, state, keep, training, p):
        mod = self.mods[k]
        parts = [] if keep is None else [m for step in keep for m in (step.chunk(2, 1) if self.lstm else (step,))]
        cell = ZoneOutCell(mod, p, iter(parts)).train(training)
        if self.lstm:
            return espnet_loop(cell, xs, state)
        out, (h,) = espnet_loop(lambda x, s: (cell(x, s[0]),), xs, state)
        return out, (h,)


def espnet_loop(cell, xs, state):
    """The decoder's loop of ESPnet around a ZoneOutCell, one step per input row."""
    outs = []
    for x in xs.unbind(0):
        state = cell(x, tuple(state))
        outs.append(state[0])
    return torch.stack(outs), tuple(state)


def load_into(model, oracle, num_layers, D):
    """Copies the oracle's tensors into the rnnext model through oracle.MAP."""
    with torch.no_grad():
        for k in range(num_layers * D):
            sfx = f"_l{k // D}" + ("_reverse" if k % D else "")
            for stem, (name, fn) in oracle.MAP.items():
                src = oracle.tensors(k)[name]
                getattr(model, stem + sfx).copy_(src if fn is None else fn(src))


def mapped_grads(oracle, grads, num_layers, D):
    """The oracle's parameter gradients carried through oracle.MAP (a permutation and transposition: linear),
    keyed by the rnnext parameter name."""
    out = {}
    for k in range(num_layers * D):
        sfx = f"_l{k // D}" + ("_reverse" if k % D else "")
        for stem, (name, fn) in oracle.MAP.items():
            g = grads[(k, name)]
            out[stem + sfx] = g if fn is None else fn(g)
    return out


def composed(oracle, x, lengths, num_layers, D, state0, masks, training, p):
    """The oracle over layers and directions: each sequence b over its own lengths[b] steps (reversed for the
    backward direction, its mask rows in that processing order), zeros past it; x [T, B, I]."""
    T, B = x.shape[:2]
    finals = [[] for _ in state0]
    for layer in range(num_layers):
        ys = []
        for d in range(D):
            k = layer * D + d
            cols = []
            for b in range(B):
                n = lengths[b]
                steps = list(range(n))[::-1] if d else list(range(n))
                keep = None if masks is None else masks[k][:n, b:b + 1]
                out, fin = oracle.run(k, x[steps, b:b + 1], tuple(s[k, b:b + 1] for s in state0), keep, training, p)
                out = out[:, 0].flip(0) if d else out[:, 0]
                cols.append(torch.cat([out, out.new_zeros(T - n, out.size(1))]))
                for i, f in enumerate(fin):
                    finals[i].append(f[0])
            ys.append(torch.stack(cols, 1))
        x = torch.cat(ys, 2)
    H = state0[0].size(-1)
    return x, [torch.stack(f).view(num_layers * D, B, H) for f in finals]


def loss_of(outs, seed=3):
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=f64)).sum() for o in outs)


# (num_layers, bidirectional, packed, hx given, zoneout: None / "train" / "eval", bias)
CONFIGS = {"plain": (1, False, False, False, None, False),
           "deep_bidir_packed_hx": (2, True, True, True, None, False),
           "deep_bidir_packed_hx_zoneout_train": (2, True, True, True, "train", False),
           "deep_hx_zoneout_eval": (2, False, False, True, "eval", False),
           "bias_bidir_packed_zoneout_train": (1, True, True, True, "train", True)}
ORACLES = {"LNGRU": lambda g, sizes, H, bias: Haste(g, sizes, H, bias),
           "LNLSTM": lambda g, sizes, H, bias: Torchaudio(g, sizes, H, bias),
           "LSTM": lambda g, sizes, H, bias: TorchCell(g, sizes, H, bias, lstm=True),
           "GRU": lambda g, sizes, H, bias: TorchCell(g, sizes, H, bias, lstm=False)}
# Haste's norms have no room for a bias before them; the plain LSTM/GRU without zoneout: test_layers.py (torch.nn)
CASES = [(m, c) for m in ORACLES for c in CONFIGS
         if not (m == "LNGRU" and CONFIGS[c][5]) and not (m in ("LSTM", "GRU") and CONFIGS[c][4] is None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,config", CASES)
def test_layer_matches_independent_code(monkeypatch, backend, mode, config):
    """Outputs (padded, zeros past each length), h_n, c_n and the gradients of a random projection of them
    w.r.t. x, h0, c0 and every parameter: the rnnext layer vs the transcribed library composed over layers
    and directions, parameters copied through the library's map, float64 at 1e-10 per tensor."""
    num_layers, bidir, packed, given_hx, zoneout, bias = CONFIGS[config]
    D, T, B, I, H, p = 1 + bidir, 5, 3, 4, 3, 0.3
    g = torch.Generator().manual_seed(len(mode) * 7 + len(config))
    oracle = ORACLES[mode](g, [I] * D + [D * H] * (D * (num_layers - 1)), H, bias)  # input size per layer-direction
    kw = (dict(zoneout=p) if zoneout else {}) | (dict(eps=oracle.eps) if hasattr(oracle, "eps") else {})
    model = oracle.cls(I, H, num_layers=num_layers, bidirectional=bidir, bias=bias, dtype=f64, **kw)
    load_into(model, oracle, num_layers, D)
    model.train(zoneout != "eval")
    lengths = [5, 2, 4] if packed else [T] * B
    x = randn(g, T, B, I, scale=1.0)
    state0 = tuple(randn(g, num_layers * D, B, H) for _ in range(oracle.states)) if given_hx else \
        tuple(torch.zeros(num_layers * D, B, H, dtype=f64) for _ in range(oracle.states))
    masks = RecordedMasks(seed=11)
    monkeypatch.setattr(functional, "keep_mask", masks)
    with rnnext.use_backend(backend):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        hx = (state0 if oracle.states == 2 else state0[0]) if given_hx else None
        out, hidden = model(inp, hx)
    y = pad_packed_sequence(out, total_length=T)[0] if packed else out
    got = [y] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    drawn = None
    if zoneout == "train":
        assert len(masks.drawn) == num_layers * D and masks.drawn[0].shape == (T, B, oracle.states * H)
        # packed input runs in the packed batch order (sorted by length): the masks' rows follow it
        drawn = [m[:, inp.unsorted_indices] for m in masks.drawn] if packed else masks.drawn
    want_y, want_states = composed(oracle, x, lengths, num_layers, D, state0, drawn, zoneout == "train",
                                   p if zoneout else 0.0)
    want = [want_y] + want_states
    for a, b in zip(got, want, strict=True):
        close(a, b, 1e-10)
    leaves = [x] + (list(state0) if given_hx else [])
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss_of(got), leaves + list(model.parameters()))
    keys = [(k, n) for k in range(num_layers * D) for n, _ in oracle.tensors(k).items()]
    want_grads = torch.autograd.grad(loss_of(want), leaves + [oracle.tensors(k)[n] for k, n in keys])
    for a, b in zip(grads[:len(leaves)], want_grads[:len(leaves)], strict=True):
        close(a, b, 1e-10)
    by_name = mapped_grads(oracle, dict(zip(keys, want_grads[len(leaves):])), num_layers, D)
    assert sorted(by_name) == sorted(names)  # the map covers every parameter of the layer
    for name, a in zip(names, grads[len(leaves):], strict=True):
        close(a, by_name[name], 1e-10)


# ---- the layer-normalised cells: one independent step --------------------------------------------------------

def cell_param(cell, stem):
    """A cell's parameter by its layer stem ("weight_ih", "ln_gates_weight", ...): the cells' names."""
    return getattr(cell, stem)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["LNLSTM", "LNGRU"])
@pytest.mark.parametrize("case", ["batched", "unbatched", "no_hx", "zoneout_eval", "zoneout_train"])
def test_cell_is_one_independent_step(monkeypatch, backend, mode, case):
    """LayerNormLSTMCell / LayerNormGRUCell vs one step of torchaudio's _CustomLSTM / Haste's LayerNormGRUScript
    (zoneout: ESPnet's ZoneOutCell / Haste's own): h' (and c'), and the gradients of a random projection of
    them w.r.t. x, h, c and every parameter, float64 at 1e-10."""
    B, I, H, p = 4, 3, 5, 0.4
    g = torch.Generator().manual_seed(20 + len(case))
    oracle = (Torchaudio if mode == "LNLSTM" else Haste)(g, [I], H, bias=mode == "LNLSTM")
    zoneout = case.startswith("zoneout")
    cell = oracle.cell_cls(I, H, bias=mode == "LNLSTM", eps=oracle.eps, zoneout=p if zoneout else 0.0, dtype=f64)
    with torch.no_grad():
        for stem, (name, fn) in oracle.MAP.items():
            src = oracle.tensors(0)[name]
            cell_param(cell, stem).copy_(src if fn is None else fn(src))
    cell.train(case == "zoneout_train")
    masks = RecordedMasks(seed=12)
    monkeypatch.setattr(functional, "keep_mask", masks)
    x = randn(g, B, I, scale=1.0)
    state = tuple(randn(g, B, H) for _ in range(oracle.states))
    if case == "no_hx":
        state = tuple(torch.zeros(B, H, dtype=f64) for _ in range(oracle.states))
    arg = None if case == "no_hx" else state if mode == "LNLSTM" else state[0]
    with rnnext.use_backend(backend):
        if case == "unbatched":
            out = cell(x[0], tuple(s[0] for s in state) if mode == "LNLSTM" else state[0][0])
        else:
            out = cell(x, arg)
    got = list(out) if isinstance(out, tuple) else [out]
    keep = masks.drawn[0].view(1, B, -1) if case == "zoneout_train" else None
    rows = slice(0, 1) if case == "unbatched" else slice(None)
    _, want = oracle.run(0, x[None, rows], tuple(s[rows] for s in state), None if keep is None else keep[:, rows],
                         case == "zoneout_train", p if zoneout else 0.0)
    want = [w[0] for w in want] if case == "unbatched" else list(want)
    for a, b in zip(got, want, strict=True):
        close(a, b, 1e-10)
    leaves = [x] + (list(state) if arg is not None else [])
    names = list(oracle.MAP)
    params = [cell_param(cell, n) for n in names]
    grads = torch.autograd.grad(loss_of(got), leaves + params)
    want_grads = torch.autograd.grad(loss_of(want), leaves + [oracle.tensors(0)[oracle.MAP[n][0]] for n in names])
    for a, b in zip(grads[:len(leaves)], want_grads[:len(leaves)], strict=True):
        close(a, b, 1e-10)
    # Haste's gamma feeds two rnnext parameters: its gradient holds both rows; the map picks each one's row
    for n, a, w in zip(names, grads[len(leaves):], want_grads[len(leaves):], strict=True):
        fn = oracle.MAP[n][1]
        close(a, w if fn is None else fn(w), 1e-10)
