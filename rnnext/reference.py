"""Pure-PyTorch cells: the fallback where no fused kernel runs, and the test oracle.

Same formulas and gate layouts as torch.nn (and as ``csrc/cells/``). One signature for every cell (the cells
of :mod:`rnnext.cells`), the same as the fused ops' (:mod:`rnnext.ops`), so :mod:`rnnext.functional` runs
either:

- ``STEPS[name](x, hp, states, params, eps) -> new states``: one step's math. x, hp ``[B, G*H]`` the input and
  hidden projections (biases included); states the tuple of the cell's states ``[B, H]``, h first; params
  the cell's own parameters (layer norm's weight and bias), eps layer norm's;
- ``step(cell, xg, hg, states)``: one step of a cell (no parameters of its own);
- ``recurrence(cell, x, w_ih, w_hh, states, ...)``: one layer-direction over a sequence, with variable
  lengths, zoneout, BPTT clipping and the LSTM's projection;
- ``keep_mask``: zoneout's masks as the CPU kernel draws them.

Whole multi-layer sequences on these: ``rnnext.functional.lstm(..., backend="reference")``.
"""
import math

import torch
import torch.nn.functional as F

from rnnext import cells
from rnnext.lengths import check_lengths, flip_within, step_mask


def lstm(x, hp, states, params, eps):
    """LSTM (i, f, g, o): c = f*c' + i*g, h = o*tanh(c)."""
    i, f, g, o = (x + hp).chunk(4, 1)
    c = f.sigmoid() * states[1] + i.sigmoid() * g.tanh()
    return o.sigmoid() * c.tanh(), c


def gru(x, hp, states, params, eps):
    """GRU (r, z, n): n = tanh(x_n + r*hp_n), h = (1-z)*n + z*h'."""
    xr, xz, xn = x.chunk(3, 1)
    hr, hz, hn = hp.chunk(3, 1)
    r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return ((1 - z) * n + z * states[0],)


def minimal_gru(x, hp, states, params, eps):
    """The lecture's GRU (u, c): an update gate and no reset gate, h = u*c~ + (1-u)*h'."""
    pu, pc = (x + hp).chunk(2, 1)
    u = pu.sigmoid()
    return (u * pc.tanh() + (1 - u) * states[0],)


def rnn_tanh(x, hp, states, params, eps):
    return ((x + hp).tanh(),)


def rnn_relu(x, hp, states, params, eps):
    return ((x + hp).relu(),)


def layernorm_lstm(x, hp, states, params, eps):
    """The layer-normalised LSTM (csrc/cells/layernorm_lstm.h): params = (w, b) [5H], the gates' norm [4H],
    then the cell's [H]; the normalised c carried."""
    (w, b), H = params, states[1].size(1)
    a = F.layer_norm(x + hp, (4 * H,), w[:4 * H], b[:4 * H], eps)
    i, f, g, o = a.chunk(4, 1)
    c = F.layer_norm(f.sigmoid() * states[1] + i.sigmoid() * g.tanh(), (H,), w[4 * H:], b[4 * H:], eps)
    return o.sigmoid() * c.tanh(), c


def layernorm_gru(x, hp, states, params, eps):
    """The layer-normalised GRU (csrc/cells/layernorm_gru.h): params = (w, b) [6H], the input projection's norm
    [3H], then the hidden one's; the GRU on the two."""
    (w, b), H3 = params, 3 * states[0].size(1)
    u = F.layer_norm(x, (H3,), w[:H3], b[:H3], eps)
    v = F.layer_norm(hp, (H3,), w[H3:], b[H3:], eps)
    return gru(u, v, states, (), eps)


def slstm(x, hp, states, params, eps):
    """xLSTM's sLSTM (i, f, z, o), states (h, c, n, m) (csrc/cells/slstm.h): where n' = 0 the state is empty,
    m = i~ and f = 0; else m = max(i~, logsigmoid(f~) + m'), f = exp(logsigmoid(f~) + m' - m); i = exp(i~ - m),
    c = f*c' + i*tanh(z~), n = f*n' + i, h = sigmoid(o~)*c/n."""
    pi, pf, pz, po = (x + hp).chunk(4, 1)
    _, c, n, m = states
    a = F.logsigmoid(pf) + m
    empty = n == 0
    m_new = torch.where(empty | (pi >= a), pi, a)
    i = (pi - m_new).exp()
    f = torch.where(empty, -math.inf, a - m_new).exp()  # exp(-inf) = 0 with gradient 0, where a - m may overflow
    c_new = f * c + i * pz.tanh()
    n_new = f * n + i
    return po.sigmoid() * c_new / n_new, c_new, n_new, m_new


STEPS = {"lstm": lstm, "gru": gru, "minimal_gru": minimal_gru, "rnn_tanh": rnn_tanh, "rnn_relu": rnn_relu,
         "layernorm_lstm": layernorm_lstm, "layernorm_gru": layernorm_gru, "slstm": slstm}


def hidden(h, w_hh, b_hh=None):
    """The hidden projection h @ w_hh^T + b_hh; w_hh ``[G*H, H/k]`` is a block-diagonal recurrence of k heads
    (H/k units each; row g*H + u of gate g and unit u reads the units of u's head)."""
    B, H = h.shape
    D = w_hh.size(1)
    if D == H:
        return F.linear(h, w_hh, b_hh)
    k = H // D
    hp = torch.einsum("bkj,gkij->bgki", h.view(B, k, D), w_hh.view(-1, k, D, D)).reshape(B, -1)
    return hp if b_hh is None else hp + b_hh


def dense_heads(w_hh, H):
    """The dense ``[G*H, H]`` block-diagonal matrix of a head-wise w_hh ``[G*H, H/k]``: head i's block padded
    into its columns (standard ops, for ONNX)."""
    GH, D = w_hh.shape
    blocks = w_hh.view(GH // H, H // D, D, D)
    return torch.stack([F.pad(blocks[:, i], (i * D, H - (i + 1) * D)) for i in range(H // D)], 1).reshape(GH, H)


def step(cell, xg, hg, states):
    """One step of cell on the projections xg, hg ``[B, G*H]`` (biases included): the new states."""
    return STEPS[cells.get(cell).name](xg, hg, tuple(states), (), 0.0)


def recurrence(cell, x, w_ih, w_hh, states, b_ih=None, b_hh=None, params=(), w_hr=None, lengths=None, reverse=False,
               clip=0.0, zoneout_mask=None, zoneout=0.0, eps=1e-5, path=0):
    """One layer-direction over a sequence: a Python loop over the cell's step.

    cell: a name of :data:`rnnext.cells.CELLS`; x ``[T, B, I]`` the input; w_ih ``[G*H, I]``; w_hh ``[G*H, P]``
    or, with k heads, ``[G*H, H/k]`` (:func:`hidden`);
    states: the initial states, h0 ``[B, P]`` (P = proj_size or H) then the others ``[B, H]`` (LSTM: c0);
    b_ih, b_hh ``[G*H]`` or None; params: the cell's own parameters; w_hr ``[P, H]`` (LSTM proj_size);
    lengths ``[B]`` int64 on x's device or None: steps t >= lengths[b] keep the states and output 0;
    reverse: run each sequence backwards within its length. clip > 0: BPTT gradient clipping, the
    gradient of the h each step produces (summed over its uses: the output and the next step) is
    clamped to [-clip, clip] (a hook on it; the fused kernels clamp the same quantity). Zoneout (cells
    with zoned states): each unit of a zoned state keeps its previous value with weight k,
    ``s = k*s_prev + (1-k)*s~`` (the LSTM's h~ uses c before zoneout), k = ``zoneout_mask[t]`` ``[B, Z*H]``
    (state z's part z) in processing order, or the constant ``zoneout`` where no mask is given. path: the
    fused ops' choice of kernel, ignored here. Returns ``y [T, B, P]`` and the final states.
    """
    cell = cells.get(cell)
    one = STEPS[cell.name]
    check_lengths(lengths, x.size(0))
    xg = F.linear(x, w_ih, b_ih)
    if reverse:
        xg = flip_within(xg, lengths)
    mask = None if lengths is None else step_mask(lengths, xg.size(0))
    zoned = cell.zoned and (zoneout_mask is not None or zoneout > 0)
    states, ys = tuple(states), []
    for t in range(xg.size(0)):
        new = list(one(xg[t], hidden(states[0], w_hh, b_hh), states, tuple(params), eps))
        if w_hr is not None:
            new[0] = F.linear(new[0], w_hr)
        if zoned:
            keep = zoneout_mask[t] if zoneout_mask is not None else torch.full_like(
                states[0].repeat(1, cell.zoned), zoneout)
            for z, k in enumerate(keep.chunk(cell.zoned, 1)):
                new[z] = k * states[z] + (1 - k) * new[z]
        if clip > 0 and new[0].requires_grad:
            new[0].register_hook(lambda g: g.clamp(-clip, clip))
        if mask is not None:
            ys.append(torch.where(mask[t], new[0], 0))
            new = [torch.where(mask[t], n, s) for n, s in zip(new, states)]
        else:
            ys.append(new[0])
        states = tuple(new)
    y = torch.stack(ys)
    if reverse:
        y = flip_within(y, lengths)
    return y, states


def _u64(c):
    """A 64-bit constant as the int64 with its bits (torch multiplies int64 modulo 2^64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z, k):
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def keep_mask(seed, size, p, dtype):
    """``torch.ops.rnnext.keep_mask`` (cpu/keep_mask.cpp) in PyTorch, bit for bit: element i is 1 where half
    i % 2 (low, high) of splitmix64 of counter i // 2 (seed + counter * golden ratio) is below p * 2^32."""
    n = math.prod(size)
    z = seed.reshape(()) + torch.arange((n + 1) // 2, dtype=torch.int64) * _u64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    halves = torch.stack([z & 0xFFFFFFFF, _shr(z, 32)], 1).flatten()[:n]
    return (halves < int(math.ldexp(p, 32))).to(dtype).view(size)
