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
