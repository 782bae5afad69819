"""rnnext.convert: torch.nn RNN modules swapped in place, parameters shared."""
import torch
from torch import nn

import rnnext


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.rnns = nn.ModuleList([nn.LSTM(6, 7, num_layers=2, bidirectional=True, batch_first=True),
                                   nn.GRU(14, 4, batch_first=True),
                                   nn.RNN(4, 3, nonlinearity="relu", batch_first=True)])
        self.cell = nn.GRUCell(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.encoder(x)
        for rnn in self.rnns:
            x, _ = rnn(x)
        return self.head(self.cell(x[:, -1]))


def test_convert_nested_model_shares_parameters():
    torch.manual_seed(0)
    model = Tagger().double()
    x = torch.randn(4, 9, 5, dtype=torch.float64)
    want = model(x)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert rnnext.convert(model) is model
    assert [type(m) for m in model.rnns] == [rnnext.LSTM, rnnext.GRU, rnnext.RNN]
    assert type(model.cell) is rnnext.GRUCell and model.rnns[2].nonlinearity == "relu"
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    got = model(x)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    before = model.rnns[0].weight_hh_l0.detach().clone()
    opt.step()  # the optimizer built before conversion updates the converted modules
    assert not torch.equal(model.rnns[0].weight_hh_l0, before)
    assert list(model.state_dict()) == list(Tagger().state_dict())


def test_convert_top_level_and_proj_size():
    lstm = nn.LSTM(3, 5, proj_size=2).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    want = lstm(x)
    ours = rnnext.convert(lstm)
    assert type(ours) is rnnext.LSTM and ours.weight_hr_l0 is lstm.weight_hr_l0
    torch.testing.assert_close(ours(x), want)
