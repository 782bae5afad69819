"""Fake (meta) kernels of the ``torch.ops.rnnext`` ops: output shapes for FakeTensor, torch.compile and meta
tensors, after the same argument checks as the C++ kernels, in the same order and with the same messages
(``csrc/driver/common.h``, ``cell_ops.h``, ``sequence.h``), so a bad call fails alike in eager and under
compile. One fake per op family, for every cell of :mod:`rnnext.cells` from its traits;
``tests/test_checks.py`` compares the two message by message.
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


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gates(G):
    return "H" if G == 1 else f"{G}*H"


def _check_path(op, path):
    _check(0 <= path <= 2, lambda: f"{op}: expected path 0 (auto), 1 (per-step) or 2 (persistent), got {path}")


def register_keep_mask(lib):
    @torch.library.register_fake(lib + "keep_mask")
    def _(seed, size, p, dtype):
        _check(seed.numel() == 1 and seed.dtype == torch.int64 and seed.device.type == "cpu",
               lambda: f"keep_mask: expected seed a one-element int64 CPU tensor, got shape {list(seed.shape)}, "
                       f"dtype {seed.dtype}, device {seed.device}")
        _check(0 <= p <= 1, lambda: f"keep_mask: expected p in [0, 1], got {p}")
        _check(dtype.is_floating_point, lambda: f"keep_mask: expected a floating dtype, got {dtype}")
        return seed.new_empty(size, dtype=dtype)


# ---- sequences (sequence.h) -----------------------------------------------------------------------

def heads(D, H, proj):
    """sequence.h heads: the number of heads of a w_hh with D columns (1: dense)."""
    return H // D if not proj and 0 < D < H and H % D == 0 else 1


def check_common(c, cell, x, w_ih, w_hh, h0, s0, params, w_hr, lengths, zoneout_mask, zoneout, clip):
    """sequence.h check_common: returns (T, B, H, P)."""
    T, B = c.ref.shape[0], c.ref.shape[1]
    G, op = cell.gates, c.op
    _check(x.dim() == 3 and x.shape[0] == T and x.shape[1] == B,
           lambda: f"{op}: expected x of shape [{T}, {B}, I], got {list(x.shape)}")
    c.like("x", x)
    I = x.shape[2]
    _check(w_ih.dim() == 2 and w_ih.shape[0] % G == 0 and w_ih.shape[0] > 0 and w_ih.shape[1] == I,
           lambda: f"{op}: expected w_ih of shape [{_gates(G)}, {I}], got {list(w_ih.shape)}")
    c.like("w_ih", w_ih)
    H = w_ih.shape[0] // G
    _check(w_hr is None or cell.proj, f"{op}: proj_size (w_hr) is not supported by this cell")
    if w_hr is not None:
        _check(w_hr.dim() == 2 and w_hr.shape[0] > 0 and w_hr.shape[1] == H,
               lambda: f"{op}: expected w_hr of shape [P, {H}] with P > 0, got {list(w_hr.shape)}")
        c.like("w_hr", w_hr)
    P = H if w_hr is None else w_hr.shape[0]
    c.shape("h0", h0, (B, P))
    c.shape("s0", s0, (cell.others, B, H))
    if not (w_hh.dim() == 2 and w_hh.shape[0] == G * H and heads(w_hh.shape[1], H, w_hr is not None) > 1):
        c.shape("w_hh", w_hh, (G * H, P))
    c.like("w_hh", w_hh)
    _check(len(params) == len(cell.params), lambda: f"{op}: expected {len(cell.params)} cell parameters (param0, "
                                                    f"param1), got {len(params)}")
    for i, t in enumerate(params):
        c.shape(f"param{i}", t, (cell.param_units * H,))
    c.lengths(lengths, B)
    c.clip(clip)
    _check(0 <= zoneout <= 1, lambda: f"{op}: expected zoneout in [0, 1], got {zoneout:g}")
    _check(cell.zoned > 0 or not (zoneout_mask is not None or zoneout > 0),
           f"{op}: zoneout is not supported by this cell")
    if zoneout_mask is not None:
        c.shape("zoneout_mask", zoneout_mask, (T, B, cell.zoned * H))
    _check(not (w_hr is not None and (zoneout_mask is not None or zoneout > 0)),
           f"{op}: zoneout with proj_size is not supported")
    return T, B, H, P


def register_seq(lib, cell):
    name = cell.name + "_seq"

    @torch.library.register_fake(lib + name)
    def _(x, w_ih, w_hh, b_ih, b_hh, h0, s0, param0, param1, w_hr=None, lengths=None, zoneout_mask=None, zoneout=0.0,
          clip=0.0, eps=1e-5, save=True, path=0):
        params = [p for p in (param0, param1) if p is not None]
        c = Checks(name, "x", x)
        c.dims(x, 3, "[T, B, I]")
        _check(x.shape[0] > 0, f"{name}: expected a sequence length larger than 0")
        T, B, H, P = check_common(c, cell, x, w_ih, w_hh, h0, s0, params, w_hr, lengths, zoneout_mask, zoneout, clip)
        for bias_name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
            if bias is not None:
                c.shape(bias_name, bias, (cell.gates * H,))
        _check(not cell.params or eps > 0, lambda: f"{name}: expected eps > 0, got {eps:g}")
        _check_path(name, path)
        Ts = T if save else 0
        return (x.new_empty(T, B, P), x.new_empty(B, P), x.new_empty(cell.others, B, H),
                x.new_empty(Ts, cell.others, B, H), x.new_empty(Ts, B, cell.saved * H),
                x.new_empty(Ts, B, cell.stats, dtype=_acc(x.dtype)), x.new_empty(T if w_hr is not None else 0, B, H))

    @torch.library.register_fake(lib + name + "_backward")
    def _(dy, dh_n, ds_n, x, w_ih, w_hh, h0, s0, param0, param1, w_hr, lengths, zoneout_mask, zoneout, clip, y, s_all,
          saved, stats, r, path, output_mask):
        params = [p for p in (param0, param1) if p is not None]
        op = name + "_backward"
        c = Checks(op, "y", y)
        c.dims(y, 3, "[T, B, P]")
        _check(y.shape[0] > 0, f"{op}: expected a sequence length larger than 0")
        T, B, H, P = check_common(c, cell, x, w_ih, w_hh, h0, s0, params, w_hr, lengths, zoneout_mask, zoneout, clip)
        _check(P == y.shape[2], lambda: f"{op}: expected y of shape [{T}, {B}, {P}], got {list(y.shape)}")
        c.shape("dy", dy, (T, B, P))
        c.shape("dh_n", dh_n, (B, P))
        c.shape("ds_n", ds_n, (cell.others, B, H))
        _check(not (saved.dim() == 3 and saved.shape[0] == 0),
               f"{op}: saved is empty: the forward ran with save=False, which saves nothing for backward")
        c.shape("saved", saved, (T, B, cell.saved * H))
        c.shape("s_all", s_all, (T, cell.others, B, H))
        acc = _acc(y.dtype)
        _check(list(stats.shape) == [T, B, cell.stats] and stats.dtype == acc,
               lambda: f"{op}: expected stats of dtype {acc} and shape [{T}, {B}, {cell.stats}], got {stats.dtype} "
                       f"{list(stats.shape)}")
        _check(stats.device == y.device, lambda: f"{op}: stats is on {stats.device} but y is on {y.device}")
        c.shape("r", r, (T if w_hr is not None else 0, B, H))
        _check_path(op, path)
        need = list(output_mask)

        def e():  # a fresh one each: the real op's outputs never alias each other
            return y.new_empty(0)

        G = cell.gates
        return (y.new_empty(x.shape) if need[0] else e(), y.new_empty(w_ih.shape) if need[1] else e(),
                y.new_empty(w_hh.shape) if need[2] else e(), y.new_empty(G * H) if need[3] else e(),
                y.new_empty(G * H) if need[4] else e(), y.new_empty(B, P) if need[5] else e(),
                y.new_empty(cell.others, B, H) if need[6] else y.new_empty(0, B, H),
                *[y.new_empty(cell.param_units * H) if need[7 + i] and i < len(params) else e() for i in range(2)],
                y.new_empty(P, H) if need[9] and w_hr is not None else e())


# ---- single-step cells (cell_ops.h) ---------------------------------------------------------------

def register_cell(lib, cell):
    name = cell.name + "_cell"
    G, Z1 = cell.gates, cell.others

    @torch.library.register_fake(lib + name)
    def _(xg, hg, h, s):
        c = Checks(name, "xg", xg)
        c.dims(xg, 2, "[B, H]" if G == 1 else f"[B, {G}*H]")
        _check(xg.shape[1] % G == 0, lambda: f"{name}: xg.size(1) = {xg.shape[1]} is not a multiple of {G}")
        B, H = xg.shape[0], xg.shape[1] // G
        c.shape("h", h, (B, H))
        c.shape("s", s, (Z1, B, H))
        c.shape("hg", hg, xg.shape)
        return h.new_empty(B, H), s.new_empty(Z1, B, H), xg.new_empty(B, cell.saved * H)

    @torch.library.register_fake(lib + name + "_backward")
    def _(dh_new, ds_new, h, s, h_new, saved):
        op = name + "_backward"
        c = Checks(op, "dh_new", dh_new)
        c.dims(dh_new, 2, "[B, H]")
        B, H = dh_new.shape
        c.shape("saved", saved, (B, cell.saved * H))
        c.shape("dh_new", dh_new, (B, H))
        c.shape("ds_new", ds_new, (Z1, B, H))
        c.shape("h", h, (B, H))
        c.shape("s", s, (Z1, B, H))
        c.shape("h_new", h_new, (B, H))
        width = (2 if cell.separate_hg else 1) * G * H
        return saved.new_empty(B, width), h.new_empty(B, H), ds_new.new_empty(Z1, B, H)
