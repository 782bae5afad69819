"""Training helpers for recurrent models."""
from typing import NamedTuple

import torch


class Chunk(NamedTuple):
    start: int  # first step of the chunk in the whole sequence
    stop: int  # one past its last step
    output: torch.Tensor  # the layer's output for steps [start, stop)
    hidden: object  # the layer's final state after the chunk (a tensor, or (h, c) for LSTM)


def _detach(hidden):
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return type(hidden)(_detach(h) for h in hidden)


def truncated_bptt(rnn, x, k, hx=None, batch_first=False):
    """Runs ``rnn`` over a long sequence ``x`` in chunks of ``k`` steps, for truncated backpropagation
    through time: yields a :class:`Chunk` per chunk; between chunks the final state is carried over,
    detached, so each chunk's backward stops at its first step.

    Works with any layer called as ``output, hidden = rnn(input, hidden)`` (rnnext's or torch.nn's
    RNN/LSTM/GRU). ``x``: ``[T, B, I]`` (``[B, T, I]`` with batch_first). Call ``backward`` on each
    chunk's loss inside the loop, before asking for the next chunk::

        for chunk in rnnext.truncated_bptt(model.rnn, x, k=35):
            loss = criterion(model.head(chunk.output), y[chunk.start:chunk.stop])
            opt.zero_grad(); loss.backward(); opt.step()
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    dim = 1 if batch_first else 0
    T = x.size(dim)
    for start in range(0, T, k):
        stop = min(start + k, T)
        output, hx = rnn(x.narrow(dim, start, stop - start), hx)
        yield Chunk(start, stop, output, hx)
        hx = _detach(hx)
