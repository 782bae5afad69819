"""Pure-PyTorch RNN, LSTM and GRU: the fallback where no fused kernel runs, and the test oracle.

Same formulas and gate layouts as torch.nn. Two levels, with the fused ops' signatures (see
:mod:`rnnext.ops`), so that :mod:`rnnext.functional` runs either:

- cells: ``lstm_cell``, ``gru_cell``, ``mgru_cell``, ``rnn_cell``;
- ``recurrence``: one layer-direction over a sequence, with variable lengths;
- ``keep_mask``: zoneout's masks as the CPU kernel draws them.

Whole multi-layer sequences on these: ``rnnext.functional.lstm(..., backend="reference")``.
"""
import math

import torch
import torch.nn.functional as F

from rnnext.lengths import check_lengths, flip_within, step_mask


def lstm_cell(xg, hg, cx):
    i, f, g, o = (xg + hg).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy, torch.cat([i, f, g, o], 1).detach()


def gru_cell(xg, hg, hx):
    xr, xz, xn = xg.chunk(3, 1)
    hr, hz, hn = hg.chunk(3, 1)
    r = (xr + hr).sigmoid()
    z = (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    hy = (1 - z) * n + z * hx
    return hy, torch.cat([r, z, n, hn], 1).detach()


def mgru_cell(xg, hg, hx):
    """The lecture's GRU: update gate u and candidate c~ only (rows (u, c)); saved = (u, c~)."""
    pu, pc = (xg + hg).chunk(2, 1)
    u, cand = pu.sigmoid(), pc.tanh()
    hy = u * cand + (1 - u) * hx
    return hy, torch.cat([u, cand], 1).detach()


def lnlstm_cell(xg, hg, cx, ln_w, ln_b, eps):
    """The layer-normalised LSTM (torchaudio's RNN-T formulation; csrc/cells/layernorm.h): biases in xg, hg;
    ln_w, ln_b [5H]: the gates' norm [4H], then the cell's [H]. Returns (h, c), c normalised."""
    H = cx.size(1)
    a = F.layer_norm(xg + hg, (4 * H,), ln_w[:4 * H], ln_b[:4 * H], eps)
    i, f, g, o = a.chunk(4, 1)
    c = F.layer_norm(f.sigmoid() * cx + i.sigmoid() * g.tanh(), (H,), ln_w[4 * H:], ln_b[4 * H:], eps)
    return o.sigmoid() * c.tanh(), c


def lngru_cell(xg, hg, hx, ln_w, ln_b, eps):
    """The layer-normalised GRU (Haste's LayerNormGRU with bias=False; biases, when given, inside the norms): the input and hidden projections (biases included)
    normalised separately, ln_w, ln_b [6H]: the input's norm [3H], then the hidden's [3H]."""
    H3 = 3 * hx.size(1)
    u = F.layer_norm(xg, (H3,), ln_w[:H3], ln_b[:H3], eps)
    v = F.layer_norm(hg, (H3,), ln_w[H3:], ln_b[H3:], eps)
    return gru_cell(u, v, hx)[0]


def rnn_cell(xg, hg, nonlinearity):
    pre = xg + hg
    if nonlinearity == "tanh":
        return pre.tanh()
    if nonlinearity == "relu":
        return pre.relu()
    raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")


def recurrence(mode, x, w_ih, h0, c0, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False,
               nonlinearity="tanh", clip=0.0, path=0, zoneout_mask=None, zoneout=0.0, ln_w=None, ln_b=None,
               eps=1e-5):
    """One layer-direction over a sequence: a Python loop over this module's cells.

    mode "LSTM", "GRU", "MGRU" (the lecture's GRU) or "RNN"; x ``[T, B, I]`` the input; w_ih ``[G*H, I]``;
    h0 ``[B, P]`` (P = proj_size or H); c0 ``[B, H]`` (LSTM only); w_hh ``[G*H, P]``; b_ih, b_hh ``[G*H]`` or
    None; w_hr ``[P, H]`` (LSTM proj_size);
    lengths ``[B]`` int64 on x's device or None: steps t >= lengths[b] keep the state and output 0;
    reverse: run each sequence backwards within its length. clip > 0: BPTT gradient clipping, the
    gradient of the state each step produces (summed over its uses: the output and the next step) is
    clamped to [-clip, clip] (a hook on it; the fused kernels clamp the same quantity). Zoneout (LSTM,
    GRU): each unit of the new state keeps its previous value with weight k, ``h = k*h_prev + (1-k)*h~``
    (LSTM: c likewise; h~ uses c before zoneout), k = ``zoneout_mask[t]`` ``[B, Z*H]`` (Z = 2 for the LSTM:
    h's part, then c's) in processing order, or the constant ``zoneout`` where no mask is given. path: the
    fused ops' choice of kernel, ignored here. Modes "LNLSTM" and "LNGRU": the layer-normalised cells
    (:func:`lnlstm_cell`, :func:`lngru_cell`) with their norms' ln_w, ln_b, eps. Returns
    ``y [T, B, P], h_n [B, P], c_n [B, H] or None``.
    """
    check_lengths(lengths, x.size(0))
    xg = F.linear(x, w_ih, b_ih)
    if reverse:
        xg = flip_within(xg, lengths)
    mask = None if lengths is None else step_mask(lengths, xg.size(0))
    h, c, ys = h0, c0, []
    for t in range(xg.size(0)):
        hg = F.linear(h, w_hh, b_hh)
        keep = None
        if zoneout_mask is not None or zoneout > 0:
            keep = zoneout_mask[t] if zoneout_mask is not None else torch.full_like(
                h.repeat(1, 2 if mode in ("LSTM", "LNLSTM") else 1), zoneout)
        if mode in ("LSTM", "LNLSTM"):
            if mode == "LSTM":
                hy, cy, _ = lstm_cell(xg[t], hg, c)
            else:
                hy, cy = lnlstm_cell(xg[t], hg, c, ln_w, ln_b, eps)
            if w_hr is not None:
                hy = F.linear(hy, w_hr)
            if keep is not None:
                kh, kc = keep.chunk(2, 1)
                hy, cy = kh * h + (1 - kh) * hy, kc * c + (1 - kc) * cy
        elif mode in ("GRU", "LNGRU"):
            hy = gru_cell(xg[t], hg, h)[0] if mode == "GRU" else lngru_cell(xg[t], hg, h, ln_w, ln_b, eps)
            cy = None
            if keep is not None:
                hy = keep * h + (1 - keep) * hy
        elif mode == "MGRU":
            hy, _ = mgru_cell(xg[t], hg, h)
            cy = None
        else:
            hy, cy = rnn_cell(xg[t], hg, nonlinearity), None
        if clip > 0 and hy.requires_grad:
            hy.register_hook(lambda g: g.clamp(-clip, clip))
        if mask is not None:
            ys.append(torch.where(mask[t], hy, 0))
            hy = torch.where(mask[t], hy, h)
            cy = None if cy is None else torch.where(mask[t], cy, c)
        else:
            ys.append(hy)
        h, c = hy, cy
    y = torch.stack(ys)
    if reverse:
        y = flip_within(y, lengths)
    return y, h, c


def _u64(c):
    """A 64-bit constant as the int64 with its bits (torch multiplies int64 modulo 2^64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z, k):
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def keep_mask(seed, size, p, dtype):
    """``torch.ops.rnnext.keep_mask`` (cpu/kernels.cpp) in PyTorch, bit for bit: element i is 1 where half
    i % 2 (low, high) of splitmix64 of counter i // 2 (seed + counter * golden ratio) is below p * 2^32."""
    n = math.prod(size)
    z = seed.reshape(()) + torch.arange((n + 1) // 2, dtype=torch.int64) * _u64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    halves = torch.stack([z & 0xFFFFFFFF, _shr(z, 32)], 1).flatten()[:n]
    return (halves < int(math.ldexp(p, 32))).to(dtype).view(size)
