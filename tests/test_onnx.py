"""ONNX export of every rnnext layer and cell (rnnext.onnx), run in onnxruntime and compared with the PyTorch
model's outputs (fp32, 1e-5 relative), under both of torch's exporters.

An export takes seconds, so each exporter writes one model holding every layer and option (ZOO below), exported
at one (T, B) and run at others: a graph with the steps unrolled or a shape baked in fails there."""
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytest.importorskip("onnx", reason="ONNX export needs onnx (requirements.txt)")
pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript (requirements.txt)")
ort = pytest.importorskip("onnxruntime", reason="the exported models run in onnxruntime (requirements.txt)")
import onnx  # noqa: E402

import rnnext  # noqa: E402
from conftest import close  # noqa: E402

I, H, P = 3, 4, 2
EXPORTERS = ["dynamo", "torchscript"]

# name: (module, given a state, the ONNX operator of each layer-direction: LSTM/GRU/RNN node, or "loop" (Scan/Loop)
# over standard ops, or None (cells without a recurrence: plain ops))
ZOO = {
    "lstm_2layers_bidir_dropout": (lambda: rnnext.LSTM(I, H, 2, bidirectional=True, dropout=0.5), False, "LSTM"),
    "gru_batch_first_nobias_hx": (lambda: rnnext.GRU(I, H, batch_first=True, bias=False), True, "GRU"),
    "rnn_relu_bidir_hx": (lambda: rnnext.RNN(I, H, nonlinearity="relu", bidirectional=True), True, "RNN"),
    "rnn_tanh_batch_first_nobias": (lambda: rnnext.RNN(I, H, bias=False, batch_first=True), False, "RNN"),
    "lstm_proj_hx": (lambda: rnnext.LSTM(I, H, proj_size=P), True, "loop"),
    "mgru": (lambda: rnnext.MinimalGRU(I, H), False, "loop"),
    "lnlstm_bidir_zoneout_hx": (lambda: rnnext.LayerNormLSTM(I, H, bidirectional=True, zoneout=0.2), True, "loop"),
    "lngru_batch_first_nobias_zoneout": (lambda: rnnext.LayerNormGRU(I, H, batch_first=True, bias=False, zoneout=0.1),
                                         False, "loop"),
    "recurrence_lstm_lengths": (lambda: Recurrence("LSTM"), True, "LSTM"),
    "recurrence_lngru_lengths": (lambda: Recurrence("LNGRU"), True, "loop"),
    "lstm_cell_hx": (lambda: rnnext.LSTMCell(I, H), True, None),
    "lstm_cell_zoneout": (lambda: rnnext.LSTMCell(I, H, zoneout=0.2), False, None),
    "gru_cell_zoneout_hx": (lambda: rnnext.GRUCell(I, H, zoneout=0.2), True, None),
    "rnn_cell_tanh_hx": (lambda: rnnext.RNNCell(I, H), True, None),
    "rnn_cell_relu_nobias": (lambda: rnnext.RNNCell(I, H, nonlinearity="relu", bias=False), False, None),
    "mgru_cell_hx": (lambda: rnnext.MinimalGRUCell(I, H), True, None),
    "lnlstm_cell_zoneout_hx": (lambda: rnnext.LayerNormLSTMCell(I, H, zoneout=0.1), True, "loop"),
    "lngru_cell": (lambda: rnnext.LayerNormGRUCell(I, H), False, "loop"),
    "slstm_bidir_heads_hx": (lambda: rnnext.sLSTM(I, H, bidirectional=True, num_heads=2), True, "loop"),
    "gru_heads": (lambda: rnnext.GRU(I, H, num_heads=4), False, "GRU"),
}
# The dynamo export of this set costs most of this file's time (about a second per layer-direction): every layer
# and cell, every option once. More combinations in the packed set below (dynamo=False only, cheap): everything
# but the writing of the nodes and loops is the same code under both exporters.
PACKED = {
    "lstm_2layers_bidir": (lambda: rnnext.LSTM(I, H, 2, bidirectional=True), False, "LSTM"),
    "lstm_batch_first_nobias_hx": (lambda: rnnext.LSTM(I, H, batch_first=True, bias=False), True, "LSTM"),
    "gru_2layers_bidir_hx": (lambda: rnnext.GRU(I, H, 2, bidirectional=True), True, "GRU"),
    "rnn_relu_bidir": (lambda: rnnext.RNN(I, H, nonlinearity="relu", bidirectional=True), False, "RNN"),
    "rnn_tanh_nobias_hx": (lambda: rnnext.RNN(I, H, bias=False), True, "RNN"),
    "lstm_proj_2layers_bidir_hx": (lambda: rnnext.LSTM(I, H, 2, proj_size=P, bidirectional=True), True, "loop"),
    "lstm_zoneout_bidir": (lambda: rnnext.LSTM(I, H, zoneout=0.3, bidirectional=True), False, "loop"),
    "gru_zoneout_bidir_nobias": (lambda: rnnext.GRU(I, H, zoneout=0.2, bidirectional=True, bias=False), False, "loop"),
    "lnlstm_bidir_hx": (lambda: rnnext.LayerNormLSTM(I, H, bidirectional=True), True, "loop"),
    "lngru_2layers_bidir_hx": (lambda: rnnext.LayerNormGRU(I, H, 2, bidirectional=True), True, "loop"),
    "mgru_bidir_nobias": (lambda: rnnext.MinimalGRU(I, H, bidirectional=True, bias=False), False, "loop"),
    "slstm_2layers_hx": (lambda: rnnext.sLSTM(I, H, 2), True, "loop"),
    "lstm_heads_bidir": (lambda: rnnext.LSTM(I, H, bidirectional=True, num_heads=2), False, "LSTM"),
}


class Recurrence(nn.Module):
    """rnnext.onnx.recurrence itself, with lengths, each direction: the layers give it lengths only from packed
    input, which dynamo=True cannot trace. In eager: rnnext.reference.recurrence, the oracle."""

    num_layers, bidirectional = 1, True

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        G = 4 if mode == "LSTM" else 3
        g = torch.Generator().manual_seed(2)
        self.register_buffer("w_ih", torch.randn(G * H, I, generator=g) * 0.5)
        self.register_buffer("w_hh", torch.randn(G * H, H, generator=g) * 0.5)
        self.register_buffer("b", torch.randn(2, G * H, generator=g) * 0.5)
        self.register_buffer("ln_w", torch.rand(2 * G * H, generator=g) + 0.5)
        self.register_buffer("ln_b", torch.randn(2 * G * H, generator=g) * 0.3)

    def forward(self, x, lengths, h):
        impl = rnnext.onnx if rnnext.onnx.exporting() else rnnext.reference
        params = (self.ln_w, self.ln_b) if self.mode == "LNGRU" else ()
        states = (h, 0.5 * h) if self.mode == "LSTM" else (h,)
        outs = []
        for reverse in (False, True):
            y, final = impl.recurrence(self.mode, x, self.w_ih, self.w_hh, states, self.b[0], self.b[1], params=params,
                                       lengths=lengths, reverse=reverse)
            outs += [y, *final]
        return tuple(outs)


def _is_cell(layer):
    return not isinstance(layer, nn.RNNBase) or isinstance(layer, (rnnext.LayerNormLSTMCell, rnnext.LayerNormGRUCell))


def _states(layer, h):
    """A state for ``layer`` from the model input h [B, H]: a different one per layer-direction, c != h."""
    if not _is_cell(layer):
        n = layer.num_layers * (2 if layer.bidirectional else 1)
        hx = h.unsqueeze(0) * torch.arange(1, n + 1, dtype=h.dtype).view(-1, 1, 1) / n
        if layer.mode in ("LSTM", "LNLSTM"):
            return (hx[..., :layer.proj_size] if layer.proj_size else hx), 0.5 * hx - 0.1
        if layer.mode == "SLSTM":  # n0 > 0 but in one unit (an empty one)
            return hx, 0.5 * hx - 0.1, (hx.abs() + 0.5) * (torch.arange(hx.size(-1)) != 1), hx - 0.3
        return hx
    return (h, 0.5 * h - 0.1) if isinstance(layer, (nn.LSTMCell, rnnext.LayerNormLSTMCell)) else h


def _named(name, out):
    """(name, tensor) for each tensor of a layer's (y, h_n or (h_n, c_n)) or a cell's h' or (h', c')."""
    flat = []
    for o in out if isinstance(out, tuple) else (out,):
        flat += list(o) if isinstance(o, tuple) else [o]
    return [(name, t) for t in flat]


class Zoo(nn.Module):
    """Every layer of ZOO on x [T, B, I] (cells on x[0]; recurrences with lengths [B]); returns all their outputs,
    flat, in ZOO's order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({name: make() for name, (make, _, _) in ZOO.items()})
        with torch.no_grad():  # the norms' weights and biases away from 1 and 0, so that a swapped half shows
            for name, p in self.named_parameters():
                if "ln_" in name:
                    p.copy_(torch.rand_like(p) + 0.5 if "_weight" in name else torch.randn_like(p) * 0.3)
        self.eval()

    def outputs(self, x, lengths, h):
        """(layer name, output) for every output of every layer."""
        outs = []
        for name, layer in self.layers.items():
            hx = _states(layer, h) if ZOO[name][1] else None
            if isinstance(layer, Recurrence):
                outs += _named(name, layer(x, lengths, h))
            elif _is_cell(layer):
                outs += _named(name, layer(x[0], hx))
            else:
                outs += _named(name, layer(x.transpose(0, 1) if layer.batch_first else x, hx))
        return outs

    def forward(self, x, lengths, h):
        return tuple(t for _, t in self.outputs(x, lengths, h))


class Packed(nn.Module):
    """PACKED's layers on pack_padded_sequence(x, lengths) (unsorted lengths), outputs padded back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleDict({name: make() for name, (make, _, _) in PACKED.items()})
        self.eval()

    def outputs(self, x, lengths, h):
        outs = []
        for name, layer in self.layers.items():
            y, state = layer(pack_padded_sequence(x, lengths, enforce_sorted=False),
                             _states(layer, h) if PACKED[name][1] else None)
            outs += _named(name, (pad_packed_sequence(y, total_length=x.size(0))[0], state))
        return outs

    def forward(self, x, lengths, h):
        return tuple(t for _, t in self.outputs(x, lengths, h))


def export(model, args, exporter, dims=None, **kwargs):
    """The ONNX bytes of model(*args), with dims[i] ({axis: name}) dynamic in args[i] if given."""
    f = io.BytesIO()
    if exporter == "dynamo":
        torch.onnx.export(model, args, f, dynamo=True, dynamic_shapes=dims and tuple(dims), **kwargs)
    else:
        names = [f"input{i}" for i in range(len(args))]
        torch.onnx.export(model, args, f, dynamo=False, input_names=names,
                          dynamic_axes=dims and dict(zip(names, dims)), **kwargs)
    return f.getvalue()


def run(model_bytes, *args):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: a.numpy() for n, a in zip(names, args)})]


def _inputs(T, B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, I, generator=g), torch.randn(B, H, generator=g)


def _zoo_inputs(T, B, seed):
    """x, lengths (one of them T), h."""
    x, h = _inputs(T, B, seed)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[seed % B] = T
    return x, lengths, h


SHAPES = [(5, 3), (8, 2), (2, 4)]  # the first is the export's


@pytest.fixture(scope="module", params=EXPORTERS)
def zoo(request):
    """(exporter, graph, {layer: [(onnxruntime outputs, PyTorch outputs) per shape]})."""
    model = Zoo()
    data = export(model, _zoo_inputs(*SHAPES[0], 0), request.param, ({0: "T", 1: "B"}, {0: "B"}, {0: "B"}))
    results = {name: [] for name in ZOO}
    for k, shape in enumerate(SHAPES):
        args = _zoo_inputs(*shape, k)
        with torch.no_grad():
            want = model.outputs(*args)
        got = run(data, *args)
        assert len(got) == len(want)
        for name in ZOO:
            results[name].append(([g for g, (n, _) in zip(got, want) if n == name],
                                  [w for n, w in want if n == name]))
    return request.param, onnx.load_from_string(data).graph, results


@pytest.mark.parametrize("name", sorted(ZOO))
def test_onnxruntime_matches_pytorch(zoo, name):
    """Every output of the layer (y, h_n, c_n; a cell's h', c') from onnxruntime against the PyTorch model, at
    the export's shape and at other T and B."""
    for got, want in zoo[2][name]:
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            close(g, w, rtol=1e-5)


def _directions(make):
    layer = make()
    return getattr(layer, "num_layers", 1) * (2 if getattr(layer, "bidirectional", False) else 1)  # a cell: one


def test_layers_become_onnx_rnn_operators_or_one_loop_each(zoo):
    """LSTM/GRU/RNN: one ONNX LSTM/GRU/RNN node per layer-direction (reverse directions as direction="reverse",
    GRU with linear_before_reset=1, RNN's nonlinearity as its activation); the others: one Scan (dynamo) or Loop
    (torchscript) per layer-direction."""
    exporter, graph, _ = zoo
    want = {op: sum(_directions(m) for m, _, o in ZOO.values() if o == op) for op in ("LSTM", "GRU", "RNN")}
    want["Scan" if exporter == "dynamo" else "Loop"] = sum(_directions(m) for m, _, o in ZOO.values()
                                                           if o == "loop")
    nodes = list(graph.node)
    got = {op: sum(n.op_type == op for n in nodes) for op in ("LSTM", "GRU", "RNN", "Scan", "Loop")}
    assert got == {**dict.fromkeys(("Scan", "Loop"), 0), **want}
    rnn_nodes = [n for n in nodes if n.op_type in ("LSTM", "GRU", "RNN")]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in rnn_nodes]
    reverse = sum(_directions(m) // 2 for m, _, op in ZOO.values()
                  if op in ("LSTM", "GRU", "RNN") and m().bidirectional)
    assert sum(a["direction"] == b"reverse" for a in attrs) == reverse
    assert all(a["direction"] in (b"forward", b"reverse") and a["hidden_size"] == H for a in attrs)
    assert [a.get("linear_before_reset") for n, a in zip(rnn_nodes, attrs) if n.op_type == "GRU"] == [1] * want["GRU"]
    relu = sum(_directions(m) for m, _, op in ZOO.values() if op == "RNN" and m().nonlinearity == "relu")
    assert sorted(a["activations"][0] for n, a in zip(rnn_nodes, attrs) if n.op_type == "RNN") == \
        [b"Relu"] * relu + [b"Tanh"] * (want["RNN"] - relu)
    assert 0 < relu < want["RNN"]


@pytest.fixture(scope="module")
def packed():
    """torchscript exporter: {layer: [(onnxruntime outputs, PyTorch outputs) per (T, lengths, B)]}."""
    model = Packed()
    runs = [([5, 2, 4], 5), ([7, 3], 8), ([1, 6, 6, 3], 6)]  # the first is the export's; T may exceed max(lengths)
    args = []
    for k, (lengths, T) in enumerate(runs):
        x, h = _inputs(T, len(lengths), 10 + k)
        args.append((x, torch.tensor(lengths), h))
    data = export(model, args[0], "torchscript", ({0: "T", 1: "B"}, {0: "B"}, {0: "B"}))
    results = {name: [] for name in PACKED}
    for a in args:
        with torch.no_grad():
            want = model.outputs(*a)
        got = run(data, *a)
        assert len(got) == len(want)
        for name in PACKED:
            results[name].append(([g for g, (n, _) in zip(got, want) if n == name],
                                  [w for n, w in want if n == name]))
    return onnx.load_from_string(data).graph, results


@pytest.mark.parametrize("name", sorted(PACKED))
def test_packed_input_matches_pytorch(packed, name):
    """Packed input (unsorted lengths, padded back with total_length=T), dynamo=False: the padded output and the
    final states from onnxruntime against the PyTorch model, at the export's shape and at other T, B, lengths."""
    for got, want in packed[1][name]:
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            close(g, w, rtol=1e-5)


def test_packed_lengths_become_sequence_lens(packed):
    """The LSTM/GRU/RNN nodes of packed input take the lengths as sequence_lens (their fifth input)."""
    nodes = [n for n in packed[0].node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert len(nodes) == sum(_directions(m) for _, (m, _, op) in PACKED.items() if op != "loop")
    assert all(len(n.input) >= 5 and n.input[4] for n in nodes)


def _tiny(layer_or_cell, train):
    x = torch.randn(4, 2, I)
    cell = not isinstance(layer_or_cell, nn.RNNBase)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = layer_or_cell

        def forward(self, x):
            return self.m(x[0] if cell else x)[0]

    return M().train(train), (x,)


# dynamo: the layer only (each failing export costs seconds); layers and cells reach the same hook
@pytest.mark.parametrize("exporter,module", [("dynamo", "layer"), ("torchscript", "layer"), ("torchscript", "cell")])
def test_training_zoneout_refuses_to_export(exporter, module):
    """Zoneout in training (random masks) raises, saying what to do; in eval it exports (tests above)."""
    model, args = _tiny(rnnext.LSTM(I, H, zoneout=0.1) if module == "layer" else rnnext.GRUCell(I, H, zoneout=0.1),
                        train=True)
    kwargs = {} if exporter == "dynamo" else dict(training=torch.onnx.TrainingMode.TRAINING)
    with pytest.raises(Exception, match="zoneout in training mode cannot be exported to ONNX.*model.eval"):
        export(model, args, exporter, **kwargs)


def test_training_dropout_exports_as_torch_nn_dynamo():
    """dynamo=True writes dropout between layers in training as torch.nn's LSTM: an ONNX Dropout node, training_mode
    true, between the two LSTM nodes."""
    graphs = []
    for cls in (nn.LSTM, rnnext.LSTM):
        model, args = _tiny(cls(I, H, 2, dropout=0.5), train=True)
        graphs.append(onnx.load_from_string(export(model, args, "dynamo")).graph)
    for graph in graphs:
        ops = [n.op_type for n in graph.node if n.op_type in ("LSTM", "Dropout")]
        assert ops == ["LSTM", "Dropout", "LSTM"]
        dropout = next(n for n in graph.node if n.op_type == "Dropout")
        consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        assert consts[dropout.input[1]] == pytest.approx(0.5) and bool(consts[dropout.input[2]])


def test_training_dropout_refuses_like_torch_nn_torchscript():
    """dynamo=False, training=TRAINING: torch.nn's LSTM with dropout raises; rnnext's does too, saying what to do."""
    kwargs = dict(training=torch.onnx.TrainingMode.TRAINING)
    model, args = _tiny(nn.LSTM(I, H, 2, dropout=0.5), train=True)
    with pytest.raises(torch.onnx.OnnxExporterError, match="dropout in training mode"):
        export(model, args, "torchscript", **kwargs)
    model, args = _tiny(rnnext.LSTM(I, H, 2, dropout=0.5), train=True)
    with pytest.raises(torch.onnx.OnnxExporterError, match="dropout between layers in training mode.*dynamo=True"):
        export(model, args, "torchscript", **kwargs)


def test_packed_input_with_dynamo_says_to_use_torchscript():
    """torch.export cannot trace packed input (nor for torch.nn's layers): the error says to export with
    dynamo=False."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = rnnext.GRU(I, H)

        def forward(self, x, lengths):
            return self.m(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]

    with pytest.raises(Exception, match="PackedSequence input does not export with .*dynamo=True.*dynamo=False"):
        export(M().eval(), (torch.randn(4, 2, I), torch.tensor([4, 2])), "dynamo")

