"""Fake (meta) kernels of the ``torch.ops.rnnext`` ops: output shapes for FakeTensor, torch.compile and
meta tensors, after the same argument checks as the C++ kernels, in the same order and with the same
messages (``csrc/driver/common.h``, ``cell_ops.h``, ``sequence.h``), so a bad call fails alike in eager
and under compile. ``tests/test_checks.py`` compares the two message by message.
"""
import torch

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(cond, msg):
    torch._check(cond, lambda: msg() if callable(msg) else msg)


class Checks:
    """Every tensor of an op is checked against one reference tensor (x in forward, y in backward)."""

    def __init__(self, op, ref_name, ref):
        self.op, self.ref_name, self.ref = op, ref_name, ref

    def dims(self, t, n, shape):
        _check(t.dim() == n, lambda: f"{self.op}: expected {self.ref_name} of shape {shape}, got {list(t.shape)}")
        _check(t.dtype in DTYPES, lambda: f"{self.op}: expected {self.ref_name} of dtype torch.float32, torch.float64, "
                                          f"torch.float16 or torch.bfloat16, got {t.dtype}")

    def like(self, name, t):
        _check(t.device == self.ref.device,
               lambda: f"{self.op}: {name} is on {t.device} but {self.ref_name} is on {self.ref.device}")
        _check(t.dtype == self.ref.dtype,
               lambda: f"{self.op}: {name} has dtype {t.dtype} but {self.ref_name} has dtype {self.ref.dtype}")

    def shape(self, name, t, shape):
        _check(list(t.shape) == list(shape), lambda: f"{self.op}: expected {name} of shape {list(shape)}, "
                                                     f"got {list(t.shape)}")
        self.like(name, t)

    def lengths(self, lengths, B):
        if lengths is None:
            return
        _check(lengths.dim() == 1 and lengths.shape[0] == B and lengths.dtype == torch.int64,
               lambda: f"{self.op}: expected lengths of dtype torch.int64 and shape [{B}], got {lengths.dtype} "
                       f"{list(lengths.shape)}")
        _check(lengths.device == self.ref.device,
               lambda: f"{self.op}: lengths is on {lengths.device} but {self.ref_name} is on {self.ref.device}")

    def clip(self, v):
        _check(v >= 0, lambda: f"{self.op}: expected clip >= 0 (0 = off), got {v:g}")


def _gates_shape(G, time):
    return ("[T, B, " if time else "[B, ") + ("H]" if G == 1 else f"{G}*H]")


def _check_path(op, path):
    _check(0 <= path <= 2, lambda: f"{op}: expected path 0 (auto), 1 (per-step) or 2 (persistent), got {path}")


def _check_zoneout(c, mask, p, Z, T, B, H, projected):
    _check(0 <= p <= 1, lambda: f"{c.op}: expected zoneout in [0, 1], got {p:g}")
    if mask is not None:
        c.shape("zoneout_mask", mask, (T, B, Z * H))
    _check(not (projected and (mask is not None or p > 0)), f"{c.op}: zoneout with proj_size is not supported")


def _check_act(nonlinearity):
    _check(nonlinearity in ("tanh", "relu"), lambda: f"Unknown nonlinearity: {nonlinearity}")


# ---- single-step cells (cell_ops.h) ---------------------------------------------------------------

def check_cell(op, ref_name, ref, G, same=(), states=()):
    """ref [B, G*H]; `same` (name, tensor) pairs of ref's shape, `states` of [B, H]. Returns H."""
    c = Checks(op, ref_name, ref)
    c.dims(ref, 2, _gates_shape(G, False))
    _check(ref.shape[1] % G == 0, lambda: f"{op}: {ref_name}.size(1) = {ref.shape[1]} is not a multiple of {G}")
    H = ref.shape[1] // G
    for name, t in same:
        c.shape(name, t, ref.shape)
    for name, t in states:
        c.shape(name, t, (ref.shape[0], H))
    return H


def _new(t, *shape):
    return t.new_empty(shape)


def register_keep_mask(lib):
    @torch.library.register_fake(lib + "keep_mask")
    def _(seed, size, p, dtype):
        _check(seed.numel() == 1 and seed.dtype == torch.int64 and seed.device.type == "cpu",
               lambda: f"keep_mask: expected seed a one-element int64 CPU tensor, got shape {list(seed.shape)}, "
                       f"dtype {seed.dtype}, device {seed.device}")
        _check(0 <= p <= 1, lambda: f"keep_mask: expected p in [0, 1], got {p}")
        _check(dtype.is_floating_point, lambda: f"keep_mask: expected a floating dtype, got {dtype}")
        return seed.new_empty(size, dtype=dtype)


def register_cells(lib):
    @torch.library.register_fake(lib + "lstm_cell")
    def _(xg, hg, cx):
        check_cell("lstm_cell", "xg", xg, 4, [("hg", hg)], [("cx", cx)])
        return _new(cx, *cx.shape), _new(cx, *cx.shape), _new(xg, *xg.shape)

    @torch.library.register_fake(lib + "lstm_cell_backward")
    def _(dhy, dcy, cx, cy, saved):
        check_cell("lstm_cell_backward", "saved", saved, 4, [], [("dhy", dhy), ("dcy", dcy), ("cx", cx), ("cy", cy)])
        return _new(saved, *saved.shape), _new(cx, *cx.shape)

    @torch.library.register_fake(lib + "gru_cell")
    def _(xg, hg, hx):
        H = check_cell("gru_cell", "xg", xg, 3, [("hg", hg)], [("hx", hx)])
        return _new(hx, *hx.shape), _new(hx, hx.shape[0], 4 * H)

    @torch.library.register_fake(lib + "gru_cell_backward")
    def _(dhy, hx, saved):
        H = check_cell("gru_cell_backward", "saved", saved, 4, [], [("dhy", dhy), ("hx", hx)])
        B = hx.shape[0]
        return _new(hx, B, 3 * H), _new(hx, B, 3 * H), _new(hx, *hx.shape)

    @torch.library.register_fake(lib + "mgru_cell")
    def _(xg, hg, hx):
        check_cell("mgru_cell", "xg", xg, 2, [("hg", hg)], [("hx", hx)])
        return _new(hx, *hx.shape), _new(xg, *xg.shape)

    @torch.library.register_fake(lib + "mgru_cell_backward")
    def _(dhy, hx, saved):
        check_cell("mgru_cell_backward", "saved", saved, 2, [], [("dhy", dhy), ("hx", hx)])
        return _new(saved, *saved.shape), _new(hx, *hx.shape)

    @torch.library.register_fake(lib + "rnn_cell")
    def _(xg, hg, nonlinearity):
        check_cell("rnn_cell", "xg", xg, 1, [("hg", hg)])
        _check_act(nonlinearity)
        return _new(xg, *xg.shape)

    @torch.library.register_fake(lib + "rnn_cell_backward")
    def _(dhy, hy, nonlinearity):
        check_cell("rnn_cell_backward", "hy", hy, 1, [("dhy", dhy)])
        _check_act(nonlinearity)
        return _new(hy, *hy.shape)


# ---- sequences (sequence.h) -----------------------------------------------------------------------

def check_seq(op, G, x, w_ih, h0, c0, w_hh, b_ih, b_hh, w_hr, lengths, clip):
    """Forward: returns (T, B, H, P)."""
    c = Checks(op, "x", x)
    c.dims(x, 3, "[T, B, I]")
    _check(x.shape[0] > 0, f"{op}: expected a sequence length larger than 0")
    T, B, I = x.shape
    _check(w_ih.dim() == 2 and w_ih.shape[0] % G == 0 and w_ih.shape[1] == I,
           lambda: f"{op}: expected w_ih of shape [{G}*H, {I}], got {list(w_ih.shape)}")
    c.like("w_ih", w_ih)
    H = w_ih.shape[0] // G
    if w_hr is not None:
        _check(w_hr.dim() == 2 and w_hr.shape[0] > 0 and w_hr.shape[1] == H,
               lambda: f"{op}: expected w_hr of shape [P, {H}] with P > 0, got {list(w_hr.shape)}")
        c.like("w_hr", w_hr)
    P = H if w_hr is None else w_hr.shape[0]
    c.shape("h0", h0, (B, P))
    if c0 is not None:
        c.shape("c0", c0, (B, H))
    c.shape("w_hh", w_hh, (G * H, P))
    if b_ih is not None:
        c.shape("b_ih", b_ih, (G * H,))
    if b_hh is not None:
        c.shape("b_hh", b_hh, (G * H,))
    c.lengths(lengths, B)
    c.clip(clip)
    return T, B, H, P


def check_seq_backward(c, G, projected, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip):
    """Backward: y fixes T, B, P; H = P, or w_hh's rows / G with an LSTM projection. Returns (T, B, H, P)."""
    c.dims(y, 3, "[T, B, P]")
    _check(y.shape[0] > 0, f"{c.op}: expected a sequence length larger than 0")
    T, B, P = y.shape
    H = w_hh.shape[0] // G if projected and w_hh.dim() == 2 else P
    c.shape("w_hh", w_hh, (G * H, P))
    c.shape("dy", dy, (T, B, P))
    c.shape("dhn", dhn, (B, P))
    c.shape("h0", h0, (B, P))
    _check(x.dim() == 3 and x.shape[0] == T and x.shape[1] == B,
           lambda: f"{c.op}: expected x of shape [{T}, {B}, I], got {list(x.shape)}")
    c.like("x", x)
    c.shape("w_ih", w_ih, (G * H, x.shape[2]))
    c.lengths(lengths, B)
    c.clip(clip)
    return T, B, H, P


def check_saved(c, saved, S, T, B, H):
    _check(not (saved.dim() == 3 and saved.shape[0] == 0 and T > 0),
           f"{c.op}: saved is empty: the forward ran with save=False, which saves nothing for backward")
    c.shape("saved", saved, (T, B, S * H))


def register_lstm_seq(lib):
    @torch.library.register_fake(lib + "lstm_seq")
    def _(x, w_ih, h0, c0, w_hh, b_ih, b_hh, w_hr, lengths, clip=0.0, save=True, path=0, zoneout_mask=None,
          zoneout=0.0):
        T, B, H, P = check_seq("lstm_seq", 4, x, w_ih, h0, c0, w_hh, b_ih, b_hh, w_hr, lengths, clip)
        _check_path("lstm_seq", path)
        _check_zoneout(Checks("lstm_seq", "x", x), zoneout_mask, zoneout, 2, T, B, H, w_hr is not None)
        Ts = T if save else 0
        return (_new(x, T, B, P), _new(x, B, P), _new(x, B, H), _new(x, Ts, B, H), _new(x, Ts, B, 4 * H),
                _new(x, T if w_hr is not None else 0, B, H))

    @torch.library.register_fake(lib + "lstm_seq_backward")
    def _(dy, dhn, dcn, x, w_ih, y, h0, c0, c_all, saved, r, w_hh, w_hr, lengths, clip=0.0, path=0, zoneout_mask=None,
          zoneout=0.0):
        c = Checks("lstm_seq_backward", "y", y)
        T, B, H, P = check_seq_backward(c, 4, w_hr is not None, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip)
        if w_hr is not None:
            c.shape("w_hr", w_hr, (P, H))
        c.shape("dcn", dcn, (B, H))
        c.shape("c0", c0, (B, H))
        c.shape("c_all", c_all, (T, B, H))
        check_saved(c, saved, 4, T, B, H)
        if w_hr is not None:
            c.shape("r", r, (T, B, H))
        _check_path(c.op, path)
        _check_zoneout(c, zoneout_mask, zoneout, 2, T, B, H, w_hr is not None)
        return (_new(y, *x.shape), _new(y, *w_ih.shape), _new(y, B, P), _new(y, B, H), _new(y, 4 * H, P),
                _new(y, 4 * H), _new(y, 4 * H), _new(y, P, H) if w_hr is not None else _new(y, 0))


def register_gated_seq(lib, name, G, S):
    """The GRU (G=3 gates, S=4 saved values per element; zoneout) and the lecture's GRU (2, 2)."""
    zoned = G == 3

    @torch.library.register_fake(lib + name)
    def _(x, w_ih, h0, w_hh, b_ih, b_hh, lengths, clip=0.0, save=True, path=0, zoneout_mask=None, zoneout=0.0):
        T, B, H, _ = check_seq(name, G, x, w_ih, h0, None, w_hh, b_ih, b_hh, None, lengths, clip)
        _check_path(name, path)
        if zoned:
            _check_zoneout(Checks(name, "x", x), zoneout_mask, zoneout, 1, T, B, H, False)
        return _new(x, T, B, H), _new(x, B, H), _new(x, T if save else 0, B, S * H)

    @torch.library.register_fake(lib + name + "_backward")
    def _(dy, dhn, x, w_ih, y, h0, saved, w_hh, lengths, clip=0.0, path=0, zoneout_mask=None, zoneout=0.0):
        c = Checks(name + "_backward", "y", y)
        T, B, H, _ = check_seq_backward(c, G, False, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip)
        check_saved(c, saved, S, T, B, H)
        _check_path(c.op, path)
        if zoned:
            _check_zoneout(c, zoneout_mask, zoneout, 1, T, B, H, False)
        return (_new(y, *x.shape), _new(y, *w_ih.shape), _new(y, B, H), _new(y, G * H, H), _new(y, G * H),
                _new(y, G * H))


def register_rnn_seq(lib):
    @torch.library.register_fake(lib + "rnn_seq")
    def _(x, w_ih, h0, w_hh, b_ih, b_hh, lengths, nonlinearity, clip=0.0, path=0):
        T, B, H, _ = check_seq("rnn_seq", 1, x, w_ih, h0, None, w_hh, b_ih, b_hh, None, lengths, clip)
        _check_path("rnn_seq", path)
        _check_act(nonlinearity)
        return _new(x, T, B, H), _new(x, B, H)

    @torch.library.register_fake(lib + "rnn_seq_backward")
    def _(dy, dhn, x, w_ih, y, h0, w_hh, lengths, nonlinearity, clip=0.0, path=0):
        c = Checks("rnn_seq_backward", "y", y)
        T, B, H, _ = check_seq_backward(c, 1, False, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip)
        _check_path(c.op, path)
        _check_act(nonlinearity)
        return _new(y, *x.shape), _new(y, *w_ih.shape), _new(y, B, H), _new(y, H, H), _new(y, H), _new(y, H)


# ---- layer-normalised cells (sequence.h: ln_seq) -----------------------------------------------------

def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_ln(c, ln_w, ln_b, N, H):
    c.shape("ln_w", ln_w, (N * H,))
    c.shape("ln_b", ln_b, (N * H,))


def check_ln_saved(c, norm, rstd, N, T, B, H):
    _check(not (norm.dim() == 3 and norm.shape[0] == 0 and T > 0),
           f"{c.op}: norm is empty: the forward ran with save=False, which saves nothing for backward")
    c.shape("norm", norm, (T, B, N * H))
    acc = _acc(c.ref.dtype)
    _check(list(rstd.shape) == [T, B, 2] and rstd.dtype == acc,
           lambda: f"{c.op}: expected rstd of dtype {acc} and shape [{T}, {B}, 2], got {rstd.dtype} "
                   f"{list(rstd.shape)}")
    _check(rstd.device == c.ref.device, lambda: f"{c.op}: rstd is on {rstd.device} but {c.ref_name} is on {c.ref.device}")


def register_ln_seq(lib, name, G, N, lstm):
    """LayerNormLSTM (lstm: c0, dcn, c_all) and LayerNormGRU."""
    def forward(x, w_ih, h0, c0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps, clip, save, path, zoneout_mask, zoneout):
        c = Checks(name, "x", x)
        T, B, H, _ = check_seq(name, G, x, w_ih, h0, c0, w_hh, b_ih, b_hh, None, lengths, clip)
        check_ln(c, ln_w, ln_b, N, H)
        _check(eps > 0, lambda: f"{name}: expected eps > 0, got {eps:g}")
        _check_path(name, path)
        _check_zoneout(c, zoneout_mask, zoneout, 2 if lstm else 1, T, B, H, False)
        Ts = T if save else 0
        y, hn, norm, rstd = _new(x, T, B, H), _new(x, B, H), _new(x, Ts, B, N * H), x.new_empty(Ts, B, 2,
                                                                                                  dtype=_acc(x.dtype))
        return (y, hn, _new(x, B, H), _new(x, Ts, B, H), norm, rstd) if lstm else (y, hn, norm, rstd)

    def backward(dy, dhn, dcn, x, w_ih, y, h0, c0, c_all, norm, rstd, w_hh, ln_w, ln_b, lengths, clip, path,
                 zoneout_mask, zoneout):
        c = Checks(name + "_backward", "y", y)
        T, B, H, _ = check_seq_backward(c, G, False, dy, dhn, x, w_ih, y, h0, w_hh, lengths, clip)
        if lstm:
            c.shape("dcn", dcn, (B, H))
            c.shape("c0", c0, (B, H))
            c.shape("c_all", c_all, (T, B, H))
        check_ln_saved(c, norm, rstd, N, T, B, H)
        check_ln(c, ln_w, ln_b, N, H)
        _check_path(c.op, path)
        _check_zoneout(c, zoneout_mask, zoneout, 2 if lstm else 1, T, B, H, False)
        grads = [_new(y, *x.shape), _new(y, *w_ih.shape), _new(y, B, H)] + ([_new(y, B, H)] if lstm else [])
        return (*grads, _new(y, G * H, H), _new(y, G * H), _new(y, G * H), _new(y, N * H), _new(y, N * H))

    if lstm:
        @torch.library.register_fake(lib + name)
        def _(x, w_ih, h0, c0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps=1e-5, clip=0.0, save=True, path=0,
              zoneout_mask=None, zoneout=0.0):
            return forward(x, w_ih, h0, c0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps, clip, save, path, zoneout_mask,
                           zoneout)

        @torch.library.register_fake(lib + name + "_backward")
        def _(dy, dhn, dcn, x, w_ih, y, h0, c0, c_all, norm, rstd, w_hh, ln_w, ln_b, lengths, clip=0.0, path=0,
              zoneout_mask=None, zoneout=0.0):
            return backward(dy, dhn, dcn, x, w_ih, y, h0, c0, c_all, norm, rstd, w_hh, ln_w, ln_b, lengths, clip, path,
                            zoneout_mask, zoneout)
    else:
        @torch.library.register_fake(lib + name)
        def _(x, w_ih, h0, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps=1e-5, clip=0.0, save=True, path=0,
              zoneout_mask=None, zoneout=0.0):
            return forward(x, w_ih, h0, None, w_hh, b_ih, b_hh, ln_w, ln_b, lengths, eps, clip, save, path,
                           zoneout_mask, zoneout)

        @torch.library.register_fake(lib + name + "_backward")
        def _(dy, dhn, x, w_ih, y, h0, norm, rstd, w_hh, ln_w, ln_b, lengths, clip=0.0, path=0, zoneout_mask=None,
              zoneout=0.0):
            return backward(dy, dhn, None, x, w_ih, y, h0, None, None, norm, rstd, w_hh, ln_w, ln_b, lengths, clip,
                            path, zoneout_mask, zoneout)
