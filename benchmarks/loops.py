"""What a user writes today for the recurrent variants torch.nn lacks: Python loops over torch.nn modules.
The baselines of bench.py's lnlstm, lngru and zlstm rows (their "torch.nn" column)."""
import torch
from torch import nn


class LayerNormLSTMLoop(nn.Module):
    """torchaudio.models.rnnt._CustomLSTM(layer_norm=True): Linear, LayerNorm and a loop over steps."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.x2g = nn.Linear(input_size, 4 * hidden_size)
        self.p2g = nn.Linear(hidden_size, 4 * hidden_size)
        self.g_norm = nn.LayerNorm(4 * hidden_size)
        self.c_norm = nn.LayerNorm(hidden_size)

    def forward(self, x):
        h = c = x.new_zeros(x.size(1), self.hidden_size)
        outputs = []
        for gates in self.x2g(x).unbind(0):
            i, f, g, o = self.g_norm(gates + self.p2g(h)).chunk(4, 1)
            c = self.c_norm(f.sigmoid() * c + i.sigmoid() * g.tanh())
            h = o.sigmoid() * c.tanh()
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class LayerNormGRULoop(nn.Module):
    """A layer-normalised GRU as a loop over steps (rnnext's formulation: biases inside the norms, norms with a
    bias)."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.x2g = nn.Linear(input_size, 3 * hidden_size)
        self.h2g = nn.Linear(hidden_size, 3 * hidden_size)
        self.x_norm = nn.LayerNorm(3 * hidden_size)
        self.h_norm = nn.LayerNorm(3 * hidden_size)

    def forward(self, x):
        h = x.new_zeros(x.size(1), self.hidden_size)
        outputs = []
        for u in self.x_norm(self.x2g(x)).unbind(0):
            (ur, uz, un), (vr, vz, vn) = u.chunk(3, 1), self.h_norm(self.h2g(h)).chunk(3, 1)
            r, z = (ur + vr).sigmoid(), (uz + vz).sigmoid()
            h = (1 - z) * (un + r * vn).tanh() + z * h
            outputs.append(h)
        return torch.stack(outputs), h


class ZoneoutLSTMLoop(nn.Module):
    """ESPnet's ZoneOutCell around nn.LSTMCell (Tacotron 2 decoders), zoneout 0.1, in a loop."""

    def __init__(self, input_size, hidden_size, zoneout=0.1):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.zoneout = zoneout

    def _zone(self, new, old):
        if self.training:
            mask = torch.bernoulli(torch.full_like(new, self.zoneout))
            return mask * old + (1 - mask) * new
        return self.zoneout * old + (1 - self.zoneout) * new

    def forward(self, x):
        h = c = x.new_zeros(x.size(1), self.cell.hidden_size)
        outputs = []
        for xt in x.unbind(0):
            hn, cn = self.cell(xt, (h, c))
            h, c = self._zone(hn, h), self._zone(cn, c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class FlashRNNVanilla(nn.Module):
    """FlashRNN's pure-PyTorch loop (NX-AI/flashrnn, ``flashrnn.flashrnn.vanilla.flashrnn_forward``: a bmm per
    step over the heads, then the cell's pointwise function): the baseline of the sLSTM and head-wise rows."""

    def __init__(self, cell, input_size, hidden_size, heads=1):
        super().__init__()
        import importlib

        vanilla = importlib.import_module("flashrnn.flashrnn.vanilla")  # the package's top level compiles CUDA
        self.forward_fn = vanilla.flashrnn_forward
        self.pointwise = vanilla.flashrnn_pointwise_function_registry[cell]
        self.states, self.heads, self.head = {"slstm": 4, "lstm": 2}[cell], heads, hidden_size // heads
        self.x2g = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.R = nn.Parameter(torch.randn(heads, self.head, 4, self.head) / self.head ** 0.5)
        self.b = nn.Parameter(torch.zeros(heads, 4, self.head))

    def forward(self, x):
        T, B = x.shape[:2]
        wx = self.x2g(x).view(T, B, 4, self.heads, self.head)
        s0 = x.new_zeros(1, B, self.states, self.heads, self.head)
        all_states, last = self.forward_fn(wx, s0, self.R, self.b.permute(1, 0, 2), self.pointwise)
        return all_states[:, :, 0].reshape(T, B, -1), last
