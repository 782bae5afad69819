"""rnnext.truncated_bptt against the hand-written chunked loop it replaces."""
import pytest
import torch
from torch import nn

import rnnext


def hand_written(rnn, head, x, y, k, lr):
    """What users write today: chunk, carry the state, detach it."""
    opt = torch.optim.SGD(list(rnn.parameters()) + list(head.parameters()), lr=lr)
    hx, grads = None, []
    for t0 in range(0, x.size(0), k):
        out, hx = rnn(x[t0:t0 + k], hx)
        loss = (head(out) - y[t0:t0 + k]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in rnn.parameters()])
        opt.step()
        hx = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()
    return grads


@pytest.mark.parametrize("cls", [rnnext.LSTM, nn.LSTM, rnnext.GRU, nn.GRU, rnnext.MinimalGRU])
@pytest.mark.parametrize("k", [1, 4, 7, 100])
def test_truncated_bptt_matches_hand_written(cls, k):
    torch.manual_seed(0)
    rnn, head = cls(3, 5).double(), nn.Linear(5, 1).double()
    x, y = torch.randn(22, 2, 3, dtype=torch.float64), torch.randn(22, 2, 1, dtype=torch.float64)
    state = [{k2: v.clone() for k2, v in m.state_dict().items()} for m in (rnn, head)]
    want = hand_written(rnn, head, x, y, k, lr=0.1)
    rnn.load_state_dict(state[0])
    head.load_state_dict(state[1])
    opt = torch.optim.SGD(list(rnn.parameters()) + list(head.parameters()), lr=0.1)
    got, spans = [], []
    for chunk in rnnext.truncated_bptt(rnn, x, k):
        loss = (head(chunk.output) - y[chunk.start:chunk.stop]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        got.append([p.grad.clone() for p in rnn.parameters()])
        spans.append((chunk.start, chunk.stop))
        opt.step()
    assert spans == [(t, min(t + k, 22)) for t in range(0, 22, k)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b)


def test_truncated_bptt_detaches_between_chunks():
    rnn = rnnext.GRU(2, 3, batch_first=True)
    x = torch.randn(2, 6, 2)
    chunks = rnnext.truncated_bptt(rnn, x, 3, batch_first=True)
    first = next(chunks)
    assert first.output.shape == (2, 3, 3)
    first.output.sum().backward()
    second = next(chunks)
    second.output.sum().backward()  # would fail ("backward through the graph a second time") without detach
    with pytest.raises(ValueError, match="k must be"):
        next(rnnext.truncated_bptt(rnn, x, 0))
