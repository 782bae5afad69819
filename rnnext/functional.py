"""Functional RNN, LSTM, GRU, MinimalGRU (the lecture's GRU) and sLSTM (xLSTM's): layers x directions x padded/packed
sequences over a backend.

The backend is chosen per call: the fused ops (:mod:`rnnext.ops`) where they run on the input's
device and dtype, else the pure-PyTorch reference (:mod:`rnnext.reference`). ``use_backend`` forces
one ("fused" raises where the fused ops cannot run).

Whole-sequence functions take torch's flat weight list (``nn.LSTM._flat_weights`` order: per layer and
direction ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``) and return what ``torch._VF.lstm/gru/rnn_*`` return.
Inputs are time-major ``[T, B, I]`` (``[B, T, I]`` with batch_first), or packed data ``[N, I]`` with
``batch_sizes``; hx ``[L*D, B, P]`` (LSTM: plus c ``[L*D, B, H]``). Each layer-direction is one
``recurrence`` of the backend, input projection included (the fused ops compute it a few steps at a time
on CPU). Gradients flow through autograd: the reference keeps its per-step graph; the fused sequence ops
save the outputs and the activated gates (see :mod:`rnnext.ops`).
"""
import contextlib
import contextvars
import functools
import os

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnext import cells, onnx, ops, reference
from rnnext.lengths import check_batch_sizes

BACKENDS = ("auto", "fused", "step", "persistent", "reference")
# The fused ops' kernel per backend (see ops.recurrence): "step" and "persistent" force one. Else the
# device's default, which RNNEXT_CUDA_PATH=persistent (or =step) overrides on CUDA: a way to opt in to
# the persistent kernels (not yet the default) for a whole program, or a whole test run.
PATHS = {"step": 1, "persistent": 2}
CUDA_PATH = os.environ.get("RNNEXT_CUDA_PATH", "")
if CUDA_PATH not in ("",) + tuple(PATHS):
    raise ValueError(f"RNNEXT_CUDA_PATH must be one of {tuple(PATHS)} or unset, got {CUDA_PATH!r}")
# Per thread and asyncio task (a new thread starts at "auto"). torch.compile guards on its value, so
# a compiled model switched to another backend recompiles rather than running the old one.
_backend = contextvars.ContextVar("rnnext_backend", default="auto")


def set_backend(name: str) -> None:
    """Selects the backend for later calls in this thread (or asyncio task): "auto" (default: fused
    where it runs, else the reference), "fused" (raise where it cannot run), "step" or "persistent"
    (fused, forcing the per-step kernels or the persistent one where it fits; see
    :func:`rnnext.ops.recurrence`) or "reference"."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend.set(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of :func:`set_backend`: the previous backend is back on exit."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def backend_for(t: torch.Tensor, backend: str | None = None):
    """The implementation (``rnnext.ops`` or ``rnnext.reference``) that runs on ``t``: both provide
    the same cells and ``recurrence``."""
    if onnx.exporting():  # under both exporters: rnnext.onnx writes ONNX operators
        return onnx
    backend = backend or _backend.get()
    if backend == "reference":
        return reference
    if ops.available(t):
        return ops
    if backend != "auto":
        reason = ops.LOAD_ERROR or f"no fused kernel for {t.dtype} on {t.device.type}"
        raise RuntimeError(f"rnnext: the fused backend was requested but cannot run: {reason}")
    return reference


# Fused CUDA kernels that have never passed tools/gpu_check.sh on a GPU: opt-in (backend "fused") until
# they have; "auto" runs the reference for them on CUDA. Head-wise recurrence (heads=True) likewise.
UNVALIDATED_ON_CUDA = frozenset(["layernorm_lstm", "layernorm_gru", "slstm"])


def _impl(cell, x, backend, heads=False):
    if onnx.exporting():
        return onnx
    if backend == "auto" and (heads or cells.get(cell).name in UNVALIDATED_ON_CUDA) and x.device.type == "cuda":
        return reference
    return backend_for(x, backend)


def _path(backend, x):
    if backend in PATHS:
        return PATHS[backend]
    return PATHS.get(CUDA_PATH, 0) if x.device.type == "cuda" else 0


# What torch.nn's RNNs do under torch.autocast, per device: "lower" runs in the autocast dtype, "fp32"
# in float32 (measured with torch 2.14 on CPU). CUDA: everything in the autocast dtype requested, a
# decision: torch 2.11's nn.LSTM ran in float16 under a bfloat16 autocast (measured on an H100).
AUTOCAST = {"cpu": {"lstm": "lower", "rnn": "lower", "rnn_cell": "lower", "gru": "fp32", "lstm_cell": "fp32",
                    "gru_cell": "fp32"}}


def _cast(obj, dtype):
    """autocast's rule: float64 is never cast."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != torch.float64 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


def _autocasting(fn):
    """Under torch.autocast, runs fn as torch.nn's RNNs run: floating inputs, states and weights cast
    to the autocast dtype (or float32, per AUTOCAST), autocast off inside. fn's first argument is the input."""
    @functools.wraps(fn)
    def wrapper(input, *args, **kwargs):
        device = input.device.type
        if not torch.is_autocast_enabled(device):
            return fn(input, *args, **kwargs)
        lower = AUTOCAST.get(device, {}).get(fn.__name__, "lower") == "lower"
        dtype = torch.get_autocast_dtype(device) if lower else torch.float32
        with torch.autocast(device, enabled=False):
            return fn(_cast(input, dtype), *_cast(args, dtype), **{k: _cast(v, dtype) for k, v in kwargs.items()})

    return wrapper


# ---- single cells: torch._VF.lstm_cell / gru_cell / rnn_*_cell ------------------------------------

def _check_cell(input, hx, w_ih, H):
    if input.size(1) != w_ih.size(1):
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {w_ih.size(1)}")
    for idx, h in enumerate(hx):
        if input.size(0) != h.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size {h.size(0)}")
        if h.size(1) != H:
            raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {h.size(1)}, expected {H}")


def _step(cell, input, states, w_ih, w_hh, b_ih, b_hh, backend):
    """One step of cell: the new states. w_hh may be head-wise (:func:`rnnext.reference.hidden`)."""
    _check_cell(input, states, w_ih, w_ih.size(0) // cells.get(cell).gates)
    xg, hg = F.linear(input, w_ih, b_ih), reference.hidden(states[0], w_hh, b_hh)
    return backend_for(input, backend).step(cell, xg, hg, tuple(states))


def _rnn_cell_name(nonlinearity):
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return "rnn_" + nonlinearity


@_autocasting
def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """One LSTM step. input ``[B, I]``, hx = (h ``[B, H]``, c ``[B, H]``) -> (h', c')."""
    return tuple(_step("lstm", input, hx, w_ih, w_hh, b_ih, b_hh, backend))


@_autocasting
def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """One GRU step. input ``[B, I]``, hx ``[B, H]`` -> h'."""
    return _step("gru", input, (hx,), w_ih, w_hh, b_ih, b_hh, backend)[0]


@_autocasting
def minimal_gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """One step of the lecture's GRU (update gate only). input ``[B, I]``, hx ``[B, H]`` -> h'."""
    return _step("minimal_gru", input, (hx,), w_ih, w_hh, b_ih, b_hh, backend)[0]


@_autocasting
def slstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """One sLSTM step (:class:`rnnext.sLSTM`): input ``[B, I]``, hx = (h, c, n, m) ``[B, H]`` each, w_hh ``[4H, H]``
    or head-wise ``[4H, H/k]`` -> (h', c', n', m')."""
    return tuple(_step("slstm", input, hx, w_ih, w_hh, b_ih, b_hh, backend))


@_autocasting
def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", backend=None):
    """One Elman RNN step, nonlinearity "tanh" or "relu". input ``[B, I]``, hx ``[B, H]`` -> h'."""
    return _step(_rnn_cell_name(nonlinearity), input, (hx,), w_ih, w_hh, b_ih, b_hh, backend)[0]


# ---- whole sequences ------------------------------------------------------------------------------

def zoneout_masks(p, T, B, parts, H, like):
    """Zoneout's keep mask of one layer-direction in training: ``[T, B, parts*H]``, 1 = keep the previous
    value, each with probability p. Drawn per layer, then per direction; in the order the direction
    processes its steps. See :func:`keep_mask`."""
    return keep_mask(p, (T, B, parts * H), like)


def keep_mask(p, size, like):
    """1 with probability p, of like's dtype and device, from torch's default generator (``torch.manual_seed``
    reproduces it). CPU: a counter-based hash of one 64-bit draw (``torch.ops.rnnext.keep_mask``, threaded;
    ``bernoulli_`` on torch's CPU generator runs on one thread, ~4 ns an element); CUDA: ``bernoulli_``."""
    if onnx.exporting():
        return onnx.keep_mask(p, size, like)
    if like.device.type != "cpu":
        return torch.empty(size, dtype=like.dtype, device=like.device).bernoulli_(p)
    seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64)
    if ops.LOAD_ERROR is None:
        return torch.ops.rnnext.keep_mask(seed, list(size), p, like.dtype)
    return reference.keep_mask(seed, size, p, like.dtype)


def _layers(cell, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
            batch_sizes, backend, clip, zoneout=0.0, cell_params=None, eps=1e-5):
    """Every layer and direction of cell (a name of rnnext.cells): hx the initial states, each [L*D, B, .] (h
    first); params torch's flat weights; cell_params per layer-direction the cell's own parameters. Returns
    (output, the final states [L*D, B, .] each)."""
    cell = cells.get(cell)
    clip = 0.0 if clip is None else float(clip)
    if clip < 0:
        raise ValueError(f"state_grad_clip must be positive or None, got {clip}")
    if not 0 <= zoneout <= 1:
        raise ValueError(f"zoneout must be in [0, 1], got {zoneout}")
    for name, tensors in (("hidden", hx), ("parameter", params)):  # torch.nn's check and message
        for t in tensors:
            if t is not None and t.device != input.device:
                raise RuntimeError(f"Input and {name} tensors are not at the same device, found input tensor at "
                                   f"{input.device} and {name} tensor at {t.device}")
    D = 2 if bidirectional else 1
    proj = cell.proj and hx[0].size(-1) != hx[1].size(-1)
    stride = (4 if has_biases else 2) + (1 if proj else 0)
    if len(params) != num_layers * D * stride:
        raise RuntimeError(f"expected {num_layers * D * stride} weight tensors, got {len(params)}")
    lengths = None
    if batch_sizes is not None:
        check_batch_sizes(batch_sizes, input.size(0))
        x, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
        lengths = lengths.to(input.device)
    else:
        x = input.transpose(0, 1) if batch_first else input
    if x.size(0) == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    backend = backend or _backend.get()
    impl = _impl(cell.name, x, backend, heads=not proj and params[1].size(1) != hx[0].size(-1))
    finals = [[] for _ in hx]
    for layer in range(num_layers):
        ys = []
        for d in range(D):
            k = layer * D + d
            p = params[k * stride:(k + 1) * stride]
            b_ih, b_hh = (p[2], p[3]) if has_biases else (None, None)
            zone = {}
            if zoneout > 0:  # training: masks; eval: the constant keep weight
                H = p[0].size(0) // cell.gates
                zone = dict(zoneout_mask=zoneout_masks(zoneout, x.size(0), x.size(1), cell.zoned, H, x)) \
                    if train else dict(zoneout=zoneout)
            w_hh = p[1]
            if impl is onnx and not proj and w_hh.size(1) != hx[0].size(-1):  # head-wise: ONNX's RNN ops are dense
                w_hh = reference.dense_heads(w_hh, hx[0].size(-1))
            y, states = impl.recurrence(cell.name, x, p[0], w_hh, tuple(s[k] for s in hx), b_ih, b_hh,
                                        params=() if cell_params is None else cell_params[k],
                                        w_hr=p[-1] if proj else None, lengths=lengths, reverse=d == 1, clip=clip,
                                        eps=eps, path=_path(backend, x), **zone)
            ys.append(y)
            for into, s in zip(finals, states):
                into.append(s)
        x = ys[0] if D == 1 else torch.cat(ys, 2)
        if dropout > 0 and train and layer < num_layers - 1:
            x = (onnx.dropout if impl is onnx else F.dropout)(x, dropout, True)
    if batch_sizes is not None and x.size(1) == 0:
        x = x.new_zeros(0, x.size(-1))
    elif batch_sizes is not None:
        x = pack_padded_sequence(x, lengths.cpu())
        # The TorchScript-based ONNX exporter removes packing only where a pad_packed_sequence takes the data and
        # batch_sizes of one pack_padded_sequence: the layer returns this batch_sizes with the data.
        x = x if impl is onnx and torch.jit.is_tracing() else x.data
    elif batch_first:
        x = x.transpose(0, 1)
    return x, tuple(torch.stack(f) for f in finals)


_CLIP_DOC = """state_grad_clip: BPTT gradient clipping inside the backward kernel: at every step, the gradient
    of the hidden state that step produced (from the output and from the next step) is clamped to
    [-v, v] before it flows into the step (LSTM: h, after projection; not the cell state). None: off."""
_ZONEOUT_DOC = """zoneout: probability p that each unit of the state keeps its previous value at a step (Krueger
    et al. 2016; LSTM: h and c, independently; masks from :func:`zoneout_masks`) when train, else the
    deterministic mixture ``p*previous + (1-p)*new``. Not with proj_size."""


@_autocasting
def lstm(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
         batch_first=False, batch_sizes=None, backend=None, state_grad_clip=None, zoneout=0.0):
    """Multi-layer LSTM, as ``torch._VF.lstm``. hx = (h0 ``[L*D, B, P]``, c0 ``[L*D, B, H]``);
    P = proj_size when params hold ``w_hr`` (then ``h0.size(-1) != c0.size(-1)``), else H.
    Returns (output ``[T, B, D*P]`` or packed data, h_n, c_n). {clip} {zoneout}"""
    if zoneout and hx[0].size(-1) != hx[1].size(-1):
        raise ValueError("zoneout is not supported with proj_size")
    x, (h, c) = _layers("lstm", input, tuple(hx), params, has_biases, num_layers, dropout, train, bidirectional,
                        batch_first, batch_sizes, backend, state_grad_clip, zoneout)
    return x, h, c


@_autocasting
def gru(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
        batch_first=False, batch_sizes=None, backend=None, state_grad_clip=None, zoneout=0.0):
    """Multi-layer GRU, as ``torch._VF.gru``. hx ``[L*D, B, H]``. Returns (output, h_n). {clip} {zoneout}"""
    x, (h,) = _layers("gru", input, (hx,), params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                      batch_sizes, backend, state_grad_clip, zoneout)
    return x, h


@_autocasting
def minimal_gru(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
         batch_first=False, batch_sizes=None, backend=None, state_grad_clip=None):
    """Multi-layer GRU of the lecture notes (update gate u and candidate c~ only, weight rows (u, c):
    ``h = u*c~ + (1-u)*h'``), flat weights and shapes as :func:`gru` with 2H gate rows. Returns
    (output, h_n). {clip}"""
    x, (h,) = _layers("minimal_gru", input, (hx,), params, has_biases, num_layers, dropout, train, bidirectional,
                      batch_first, batch_sizes, backend, state_grad_clip)
    return x, h


@_autocasting
def rnn(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
        batch_first=False, batch_sizes=None, nonlinearity="tanh", backend=None, state_grad_clip=None):
    """Multi-layer Elman RNN (nonlinearity "tanh" or "relu"), as ``torch._VF.rnn_tanh``. Returns
    (output, h_n). {clip}"""
    x, (h,) = _layers(_rnn_cell_name(nonlinearity), input, (hx,), params, has_biases, num_layers, dropout, train,
                      bidirectional, batch_first, batch_sizes, backend, state_grad_clip)
    return x, h


@_autocasting
def slstm(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
          batch_first=False, batch_sizes=None, backend=None, state_grad_clip=None):
    """Multi-layer sLSTM (xLSTM's; equations: :class:`rnnext.sLSTM`), flat weights as :func:`lstm` (gate rows
    (i, f, z, o); w_hh ``[4H, H]`` or head-wise ``[4H, H/k]``). hx = (h0, c0, n0, m0) ``[L*D, B, H]`` each. Returns
    (output, h_n, c_n, n_n, m_n). {clip}"""
    x, states = _layers("slstm", input, tuple(hx), params, has_biases, num_layers, dropout, train, bidirectional,
                        batch_first, batch_sizes, backend, state_grad_clip)
    return (x, *states)


_LN_DOC = """ln: per layer and direction (layer-major, as the flat weights), the pair (weight, bias) of the
    layer norms, ``[N*H]`` each; eps: their epsilon."""


@_autocasting
def layer_norm_lstm(input, hx, params, ln, has_biases=True, num_layers=1, dropout=0.0, train=False,
                    bidirectional=False, batch_first=False, batch_sizes=None, backend=None, state_grad_clip=None,
                    zoneout=0.0, eps=1e-5):
    """Multi-layer layer-normalised LSTM (the 4H gate pre-activations and the cell state normalised, the
    normalised cell state carried; see :class:`rnnext.LayerNormLSTM`): arguments and results as :func:`lstm`
    (no proj_size), ln's N = 5 (gates' 4H, then cell's H). {ln} {clip} {zoneout}"""
    x, (h, c) = _layers("layernorm_lstm", input, tuple(hx), params, has_biases, num_layers, dropout, train,
                        bidirectional, batch_first, batch_sizes, backend, state_grad_clip, zoneout, ln, eps)
    return x, h, c


@_autocasting
def layer_norm_gru(input, hx, params, ln, has_biases=True, num_layers=1, dropout=0.0, train=False,
                   bidirectional=False, batch_first=False, batch_sizes=None, backend=None, state_grad_clip=None,
                   zoneout=0.0, eps=1e-5):
    """Multi-layer layer-normalised GRU (Haste's LayerNormGRU with bias=False; biases, when given, inside the
    norms: the input and hidden projections normalised separately; see :class:`rnnext.LayerNormGRU`):
    arguments and results as :func:`gru`, ln's N = 6 (input's 3H, then hidden's 3H). {ln} {clip} {zoneout}"""
    x, (h,) = _layers("layernorm_gru", input, (hx,), params, has_biases, num_layers, dropout, train, bidirectional,
                      batch_first, batch_sizes, backend, state_grad_clip, zoneout, ln, eps)
    return x, h


for _f in (lstm, gru, minimal_gru, rnn, slstm, layer_norm_lstm, layer_norm_gru):
    _f.__doc__ = _f.__doc__.replace("{clip}", _CLIP_DOC).replace("{zoneout}", _ZONEOUT_DOC).replace("{ln}", _LN_DOC)
