"""Drop-in ``torch.nn`` layers and cells running on :mod:`rnnext.functional`.

The layers subclass ``torch.nn.RNNBase``, not ``nn.LSTM``/``nn.GRU``/``nn.RNN``: Dynamo refuses to
trace instances of those three ("Attempted to wrap RNN, GRU, or LSTM"), and compiling without graph
breaks is one of rnnext's promises. Constructor, parameters, state_dict, argument checks and error
messages are torch.nn's (the LSTM-specific checks are borrowed unbound from ``nn.LSTM``); only the
computation differs.
"""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rnnext import functional, onnx


def _check_zoneout(zoneout, proj_size=0):
    if not 0 <= zoneout <= 1:
        raise ValueError(f"zoneout must be in [0, 1], got {zoneout}")
    if zoneout and proj_size:
        raise ValueError("zoneout is not supported with proj_size")
    return float(zoneout)


def _zoned(new, old, zoneout, training):
    """Zoneout of one step (the cells): each unit keeps its previous value with probability zoneout in
    training (a mask from torch's generator, :func:`rnnext.functional.keep_mask`), the mixture
    zoneout*old + (1-zoneout)*new in eval."""
    if not zoneout:
        return new
    keep = functional.keep_mask(zoneout, new.shape, new) if training else zoneout
    return keep * old + (1 - keep) * new


class _NoScript:
    """torch.jit.script cannot compile rnnext's forward (Python dispatch to the fused ops, PackedSequence,
    autocast, backend switch): one clear error instead of TorchScript's first complaint. torch.jit.script calls
    ``__prepare_scriptable__`` on every submodule first."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"rnnext.{type(self).__name__} does not support torch.jit.script; use torch.jit.trace(model, inputs), "
            "torch.export.export(model, args) (AOTInductor, ONNX), or rnnext.to_torch(model) for torch.nn's layers")


def _check_heads(num_heads, hidden_size, proj_size=0):
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads > 1 and proj_size:
        raise ValueError("num_heads is not supported with proj_size")
    return num_heads


def _reshape_weights(module, names, shape):
    """Replaces the parameters named by new ones of shape(old shape) (uninitialised: reset_parameters next)."""
    for name in names:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(old.new_empty(shape(tuple(old.shape)))))


class _Layer(_NoScript, nn.RNNBase):
    """num_heads=k (every layer): head-wise recurrence, W_hh block-diagonal with k heads of H/k units, stored as
    its diagonal blocks: ``weight_hh_l{n}`` is ``[G*H, H/k]``, row g*H + u (gate g of unit u) holding the weights
    from the H/k units of u's head (units of head i: i*H/k to (i+1)*H/k - 1). num_heads=1 is the dense layer."""

    def __init__(self, mode, *args, state_grad_clip=None, num_heads=1, **kwargs):
        super().__init__(mode, *args, **kwargs)
        if state_grad_clip is not None and not state_grad_clip > 0:
            raise ValueError(f"state_grad_clip must be positive or None, got {state_grad_clip}")
        self.state_grad_clip = state_grad_clip
        self.zoneout = 0.0  # LSTM and GRU take it as a keyword
        self.num_heads = _check_heads(num_heads, self.hidden_size, self.proj_size)
        if num_heads > 1:
            _reshape_weights(self, [n for names in self._all_weights for n in names if n.startswith("weight_hh")],
                             lambda s: (s[0], s[1] // num_heads))
            self.reset_parameters()
            self._init_flat_weights()

    def flatten_parameters(self):
        """No-op: rnnext's kernels read the parameters as they are (cuDNN's flat buffer is not used)."""

    def extra_repr(self):
        s = super().extra_repr()
        s += f", num_heads={self.num_heads}" if self.num_heads > 1 else ""
        s += f", state_grad_clip={self.state_grad_clip}" if self.state_grad_clip is not None else ""
        return s + (f", zoneout={self.zoneout}" if self.zoneout else "")

    def _run(self, input, hx, batch_sizes):
        raise NotImplementedError

    def _check_hx_dims(self, hx, is_batched):
        want = 3 if is_batched else 2
        if hx.dim() != want:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")

    def _unbatch_hx(self, hx):
        return hx.unsqueeze(1)

    def _zeros(self, input, batch):
        D = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * D, batch, self.hidden_size, dtype=input.dtype, device=input.device)

    def forward(self, input, hx=None):
        """input ``[T, B, I]`` (``[B, T, I]`` with batch_first), ``[T, I]`` unbatched, or a PackedSequence;
        returns (output, h_n) like the torch.nn layer (LSTM: (output, (h_n, c_n)))."""
        self._update_flat_weights()
        orig_input = input
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            if onnx.exporting():
                onnx.check_packed()
            # sorted_indices' size is the batch and a traced dimension (ONNX export with a dynamic batch)
            batch = int(batch_sizes[0]) if sorted_indices is None else sorted_indices.size(0)
            is_batched = True
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(self._dims_message.format(input.dim()))
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                self._check_hx_dims(hx, is_batched)
                if not is_batched:
                    hx = self._unbatch_hx(hx)
            batch = input.size(batch_dim)
        hx = self._zeros(input, batch) if hx is None else self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)
        output, hidden = self._run(input, hx, batch_sizes)
        if isinstance(output, PackedSequence):  # ONNX export, dynamo=False: see rnnext.functional._layers
            output, batch_sizes = output.data, output.batch_sizes
        if isinstance(orig_input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = tuple(h.squeeze(1) for h in hidden) if isinstance(hidden, tuple) else hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _args(self, batch_sizes):
        return dict(has_biases=self.bias, num_layers=self.num_layers, dropout=self.dropout, train=self.training,
                    bidirectional=self.bidirectional, batch_first=self.batch_first, batch_sizes=batch_sizes,
                    state_grad_clip=self.state_grad_clip)


class LSTM(_Layer):
    """Drop-in ``torch.nn.LSTM``: same constructor (input_size, hidden_size, num_layers, bias, batch_first,
    dropout, bidirectional, proj_size, device, dtype), parameters, state_dict and errors; two more
    keywords for all layers: ``state_grad_clip`` (BPTT gradient clipping) and ``zoneout`` (probability of
    each unit of h and c keeping its previous value at a step in training; the mixture in eval; not with
    proj_size), see :func:`rnnext.functional.lstm`.

    forward(input, hx=None) -> (output, (h_n, c_n)): input ``[T, B, I]`` (``[B, T, I]`` with batch_first),
    ``[T, I]`` unbatched, or a PackedSequence; hx = (h0 ``[L*D, B, P]``, c0 ``[L*D, B, H]``), P = proj_size or H;
    output ``[T, B, D*P]``. dtypes: float32/float64/float16/bfloat16. Saved for backward per
    layer-direction: the output, the activated gates ``[T, B, 4H]``, the cell states ``[T, B, H]`` (and the
    cell outputs before projection with proj_size)."""

    _dims_message = "LSTM: Expected input to be 2D or 3D, got {}D instead"
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, zoneout=0.0, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self.zoneout = _check_zoneout(zoneout, self.proj_size)

    def _check_hx_dims(self, hx, is_batched):
        want = 3 if is_batched else 2
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")

    def _unbatch_hx(self, hx):
        return hx[0].unsqueeze(1), hx[1].unsqueeze(1)

    def _zeros(self, input, batch):
        c = super()._zeros(input, batch)
        if self.proj_size > 0:
            return c.new_zeros(c.size(0), batch, self.proj_size), c
        return c, torch.zeros_like(c)

    def _run(self, input, hx, batch_sizes):
        output, h, c = functional.lstm(input, hx, self._flat_weights, zoneout=self.zoneout, **self._args(batch_sizes))
        return output, (h, c)


class GRU(_Layer):
    """Drop-in ``torch.nn.GRU``: same constructor, parameters, state_dict and errors; ``state_grad_clip``
    and ``zoneout`` as :class:`LSTM` (zoneout on h).

    forward(input, hx=None) -> (output, h_n): input ``[T, B, I]`` (``[B, T, I]`` with batch_first), ``[T, I]``
    unbatched, or a PackedSequence; hx ``[L*D, B, H]``; output ``[T, B, D*H]``. Saved for backward per
    layer-direction: the output and the gates (r, z, n, W_hn h + b_hn) ``[T, B, 4H]``."""

    _dims_message = "GRU: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, *args, zoneout=0.0, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)
        self.zoneout = _check_zoneout(zoneout)

    def _run(self, input, hx, batch_sizes):
        return functional.gru(input, hx, self._flat_weights, zoneout=self.zoneout, **self._args(batch_sizes))


class RNN(_Layer):
    """Drop-in ``torch.nn.RNN`` (nonlinearity "tanh" or "relu"): same constructor, parameters, state_dict
    and errors.

    forward(input, hx=None) -> (output, h_n), shapes as :class:`GRU`. Saved for backward per
    layer-direction: the output only."""

    _dims_message = "RNN: Expected input to be 2D or 3D, got {}D tensor instead"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)

    def _run(self, input, hx, batch_sizes):
        return functional.rnn(input, hx, self._flat_weights, nonlinearity=self.nonlinearity,
                              **self._args(batch_sizes))


class MinimalGRU(_Layer):
    """The GRU of the lecture notes: an update gate and no reset gate,
    ``u = sigmoid(W_u [h', x]), c~ = tanh(W_c [h', x]), h = u*c~ + (1-u)*h'``.

    Same constructor, forward, shapes and parameter names as :class:`GRU` (no proj_size), with 2H gate
    rows (u, c) in ``weight_ih_l{k}``, ``weight_hh_l{k}`` and the biases. Saved for backward per
    layer-direction: the output and (u, c~) ``[T, B, 2H]``."""

    _dims_message = "MinimalGRU: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not MinimalGRU")
        super().__init__("RNN_TANH", *args, **kwargs)  # torch.nn knows no 2-gate mode: widen its weights
        self.mode = "MINIMAL_GRU"
        _reshape_weights(self, [n for names in self._all_weights for n in names], lambda s: (2 * s[0],) + s[1:])
        self.reset_parameters()
        self._init_flat_weights()

    def _run(self, input, hx, batch_sizes):
        return functional.minimal_gru(input, hx, self._flat_weights, **self._args(batch_sizes))


class sLSTM(_Layer):
    """The sLSTM of xLSTM (Beck et al., 2024): exponential input and forget gates with a stabiliser state m, and a
    normaliser state n. Gate rows (i, f, z, o) of ``weight_ih_l{k}`` ``[4H, I]``, ``weight_hh_l{k}`` ``[4H, H]``
    (``[4H, H/k]`` with num_heads=k: :class:`LSTM`'s layout) and the biases; per step, with
    ``p = W_ih x + b_ih + W_hh h' + b_hh`` split into (i~, f~, z~, o~) and lf = logsigmoid(f~)::

        where n' = 0 (an empty state, as the zero initial state): m = i~, f = 0
        else: m = max(i~, lf + m'), f = exp(lf + m' - m)
        i = exp(i~ - m),  c = f*c' + i*tanh(z~),  n = f*n' + i,  h = sigmoid(o~) * c / n

    FlashRNN's and xLSTM's rule m = i~ "where all of n is 0" made per element: with it n >= 1 at every step, so
    FlashRNN's clamp n >= 1 never acts and h never divides by 0; the two agree but where a given n0 is zero in
    some units only, or in the gradients of c0 and n0 at n0 = 0 (FlashRNN: f*dc; here c0 is ignored there).

    Constructor as :class:`LSTM` (input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
    device, dtype; ``state_grad_clip``, ``num_heads``; no proj_size, no zoneout). forward(input, hx=None) ->
    (output, (h_n, c_n, n_n, m_n)): input as :class:`LSTM`'s, hx = (h0, c0, n0, m0) ``[L*D, B, H]`` each (zeros
    by default). The states are carried in float within a sequence for 16-bit inputs; h_n..m_n come back in the
    input's dtype."""

    _dims_message = "sLSTM: Expected input to be 2D or 3D, got {}D instead"
    STATES = ("h", "c", "n", "m")

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not sLSTM")
        super().__init__("LSTM", *args, **kwargs)  # torch.nn's 4-gate weights
        self.mode = "SLSTM"

    def _check_hx_dims(self, hx, is_batched):
        want = 3 if is_batched else 2
        if not isinstance(hx, (tuple, list)) or len(hx) != 4:
            raise RuntimeError("sLSTM: expected hx to be a tuple of four tensors (h0, c0, n0, m0)")
        if any(h.dim() != want for h in hx):
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx (h0, c0, n0, m0) should also be {want}-D but got "
                               f"{tuple(h.dim() for h in hx)}-D tensors")

    def _unbatch_hx(self, hx):
        return tuple(h.unsqueeze(1) for h in hx)

    def _zeros(self, input, batch):
        h = super()._zeros(input, batch)
        return (h, torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h))

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        if not isinstance(hidden, (tuple, list)) or len(hidden) != 4:
            raise RuntimeError("sLSTM: expected hx to be a tuple of four tensors (h0, c0, n0, m0)")
        expected = self.get_expected_hidden_size(input, batch_sizes)
        for k, (name, h) in enumerate(zip(self.STATES, hidden)):
            self.check_hidden_size(h, expected, f"Expected hidden[{k}] ({name}0) size {{}}, got {{}}")

    def permute_hidden(self, hx, permutation):
        if permutation is None:
            return hx
        return tuple(h.index_select(1, permutation) for h in hx)

    def _run(self, input, hx, batch_sizes):
        output, *states = functional.slstm(input, hx, self._flat_weights, **self._args(batch_sizes))
        return output, tuple(states)


# ---- layer-normalised layers ---------------------------------------------------------------------

class _LayerNormed:
    """Registers the layer norms' weight (ones) and bias (zeros) of every layer and direction:
    ``<name>_weight_l{k}[_reverse]`` and ``<name>_bias_...`` for each (name, size in units of H) of
    _NORMS; ``_ln()`` gives them concatenated per layer-direction, as the functional API wants them."""

    _NORMS = ()

    def _init_norms(self, eps):
        if self.proj_size:
            raise ValueError(f"proj_size is not supported by {type(self).__name__}")
        self.eps = float(eps)
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        kw = dict(device=self.weight_hh_l0.device, dtype=self.weight_hh_l0.dtype)
        for k in range(self.num_layers * (2 if self.bidirectional else 1)):
            sfx = f"_l{k // 2 if self.bidirectional else k}" + ("_reverse" if self.bidirectional and k % 2 else "")
            for name, n in self._NORMS:
                self.register_parameter(f"{name}_weight{sfx}", nn.Parameter(torch.ones(n * self.hidden_size, **kw)))
                self.register_parameter(f"{name}_bias{sfx}", nn.Parameter(torch.zeros(n * self.hidden_size, **kw)))

    def _suffixes(self):
        D = 2 if self.bidirectional else 1
        return [f"_l{k // D}" + ("_reverse" if k % D else "") for k in range(self.num_layers * D)]

    def reset_parameters(self):
        """torch.nn's initialisation of the recurrent weights; the norms: weight 1, bias 0."""
        super().reset_parameters()
        for name, param in self.named_parameters():
            if name.startswith(tuple(n for n, _ in self._NORMS)):
                nn.init.ones_(param) if "_weight" in name else nn.init.zeros_(param)

    def _ln(self):
        return [(torch.cat([getattr(self, f"{n}_weight{sfx}") for n, _ in self._NORMS]),
                 torch.cat([getattr(self, f"{n}_bias{sfx}") for n, _ in self._NORMS])) for sfx in self._suffixes()]

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}"


class LayerNormLSTM(_LayerNormed, LSTM):
    """Layer-normalised LSTM, torchaudio's RNN-T formulation (``_CustomLSTM(layer_norm=True)``) with
    torch.nn.LSTM's API (num_layers, bidirectional, batch_first, dropout, bias, PackedSequence, unbatched
    input, hx; no proj_size). Per layer and direction, with ``LN(v) = (v - mean v) / sqrt(var v + eps) * w + b``
    over the row's features::

        a = LN_g(W_ih x + b_ih + W_hh h' + b_hh)                  (4H gate pre-activations, ln_gates_*)
        i, f, g, o = sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)
        c = LN_c(f * c' + i * g)                                    (the normalised cell state is carried, ln_cell_*)
        h = o * tanh(c)

    Parameters: torch.nn.LSTM's, plus ``ln_gates_weight_l{k}`` / ``ln_gates_bias_l{k}`` ``[4H]`` and
    ``ln_cell_weight_l{k}`` / ``ln_cell_bias_l{k}`` ``[H]`` (``_reverse`` for the backward direction), initialised
    to 1 and 0. Keywords: ``eps`` (1e-5; torchaudio's RNN-T uses 1e-3), ``zoneout``, ``state_grad_clip``.
    torchaudio's _CustomLSTM(layer_norm=True) is ``bias=False`` here: weight_ih_l0 = x2g.weight, weight_hh_l0 =
    p2g.weight, ln_gates_* = g_norm's, ln_cell_* = c_norm's."""

    _NORMS = (("ln_gates", 4), ("ln_cell", 1))
    _dims_message = "LayerNormLSTM: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, *args, eps=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_norms(eps)

    def _run(self, input, hx, batch_sizes):
        output, h, c = functional.layer_norm_lstm(input, hx, self._flat_weights, self._ln(), zoneout=self.zoneout,
                                                  eps=self.eps, **self._args(batch_sizes))
        return output, (h, c)


class LayerNormGRU(_LayerNormed, GRU):
    """Layer-normalised GRU with torch.nn.GRU's API; with ``bias=False`` Haste's ``LayerNormGRU`` (whose norms have
    no bias and whose biases come after them: ln_input_bias = bias, ln_hidden_bias = recurrent_bias, gamma[0],
    gamma[1] the norms' weights, Haste's gate blocks (z, r, h) reordered to (r, z, n)). With ``bias=True`` the
    biases sit inside the norms (not in Haste). Per layer and direction::

        u = LN_x(W_ih x + b_ih),  v = LN_h(W_hh h' + b_hh)         (3H each, ln_input_*, ln_hidden_*)
        r = sigmoid(u_r + v_r), z = sigmoid(u_z + v_z), n = tanh(u_n + r * v_n), h = (1 - z) * n + z * h'

    Parameters: torch.nn.GRU's, plus ``ln_input_weight_l{k}`` / ``ln_input_bias_l{k}`` and
    ``ln_hidden_weight_l{k}`` / ``ln_hidden_bias_l{k}``, ``[3H]`` each. Keywords: ``eps``, ``zoneout``,
    ``state_grad_clip``."""

    _NORMS = (("ln_input", 3), ("ln_hidden", 3))
    _dims_message = "LayerNormGRU: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, *args, eps=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_norms(eps)

    def _run(self, input, hx, batch_sizes):
        return functional.layer_norm_gru(input, hx, self._flat_weights, self._ln(), zoneout=self.zoneout, eps=self.eps,
                                         **self._args(batch_sizes))


# ---- cells ----------------------------------------------------------------------------------------

def _cell_input(name, input, hx, hx_label="hidden"):
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if hx is not None and hx.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected {hx_label} to be 1D or 2D, got {hx.dim()}D instead")
    return input.dim() == 2


def _single_state_step(cell, name, input, hx, step, zoneout=0.0, **kwargs):
    """torch.nn's GRUCell/RNNCell forward around one functional step: checks, unbatched input, zero hx."""
    is_batched = _cell_input(name, input, hx)
    if not is_batched:
        input = input.unsqueeze(0)
    hx = input.new_zeros(input.size(0), cell.hidden_size) if hx is None else hx if is_batched else hx.unsqueeze(0)
    h = _zoned(step(input, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, **kwargs), hx, zoneout,
               cell.training)
    return h if is_batched else h.squeeze(0)


class LSTMCell(_NoScript, nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell`` on the fused cell op (``torch.ops.rnnext.lstm_cell``); saves the
    activated gates ``[B, 4H]`` for backward. ``zoneout``: as :class:`LSTM`'s, for h and c."""

    def __init__(self, *args, zoneout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.zoneout = _check_zoneout(zoneout)

    def forward(self, input, hx=None):
        """input ``[B, I]`` or ``[I]``; hx = (h, c) ``[B, H]`` or None -> (h', c')."""
        for idx, value in enumerate(hx or ()):
            _cell_input("LSTMCell", input, value, f"hx[{idx}]")
        is_batched = _cell_input("LSTMCell", input, None)
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = functional.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        h = _zoned(h, hx[0], self.zoneout, self.training)
        c = _zoned(c, hx[1], self.zoneout, self.training)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_NoScript, nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell`` on the fused cell op (``torch.ops.rnnext.gru_cell``); saves the gates
    (r, z, n, W_hn h + b_hn) ``[B, 4H]`` for backward. ``zoneout``: as :class:`GRU`'s."""

    def __init__(self, *args, zoneout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.zoneout = _check_zoneout(zoneout)

    def forward(self, input, hx=None):
        """input ``[B, I]`` or ``[I]``; hx ``[B, H]`` or None -> h'."""
        return _single_state_step(self, "GRUCell", input, hx, functional.gru_cell, zoneout=self.zoneout)


class RNNCell(_NoScript, nn.RNNCell):
    """Drop-in ``torch.nn.RNNCell`` (nonlinearity "tanh" or "relu") on the fused cell op
    (``torch.ops.rnnext.rnn_cell``); saves its output for backward."""

    def forward(self, input, hx=None):
        """input ``[B, I]`` or ``[I]``; hx ``[B, H]`` or None -> h'."""
        return _single_state_step(self, "RNNCell", input, hx, functional.rnn_cell, nonlinearity=self.nonlinearity)


class MinimalGRUCell(_NoScript, nn.RNNCellBase):
    """One step of :class:`MinimalGRU` (update gate only) on the fused cell op
    (``torch.ops.rnnext.minimal_gru_cell``); weights ``[2H, I]``, ``[2H, H]`` with rows (u, c); saves (u, c~)."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=2, device=device, dtype=dtype)

    def forward(self, input, hx=None):
        """input ``[B, I]`` or ``[I]``; hx ``[B, H]`` or None -> h'."""
        return _single_state_step(self, "MinimalGRUCell", input, hx, functional.minimal_gru_cell)


class sLSTMCell(_NoScript, nn.RNNCellBase):
    """One step of :class:`sLSTM` on the fused cell op (``torch.ops.rnnext.slstm_cell``): weights ``weight_ih``
    ``[4H, I]``, ``weight_hh`` ``[4H, H/num_heads]`` (rows (i, f, z, o)), biases ``[4H]``.
    forward(input ``[B, I]`` or ``[I]``, hx = (h, c, n, m) or None: zeros) -> (h', c', n', m'); the states have
    the input's dtype."""

    def __init__(self, input_size, hidden_size, bias=True, num_heads=1, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self.num_heads = _check_heads(num_heads, hidden_size)
        if num_heads > 1:
            _reshape_weights(self, ["weight_hh"], lambda s: (s[0], s[1] // num_heads))
            self.reset_parameters()

    def extra_repr(self):
        return super().extra_repr() + (f", num_heads={self.num_heads}" if self.num_heads > 1 else "")

    def forward(self, input, hx=None):
        for idx, value in enumerate(hx or ()):
            _cell_input("sLSTMCell", input, value, f"hx[{idx}]")
        is_batched = _cell_input("sLSTMCell", input, None)
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = tuple(input.new_zeros(input.size(0), self.hidden_size) for _ in range(4))
        elif len(hx) != 4:
            raise RuntimeError("sLSTMCell: expected hx to be a tuple of four tensors (h, c, n, m)")
        elif not is_batched:
            hx = tuple(h.unsqueeze(0) for h in hx)
        new = functional.slstm_cell(input, tuple(hx), self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return new if is_batched else tuple(h.squeeze(0) for h in new)


class _LayerNormCell(_NoScript, nn.Module):
    """One step of a layer-normalised layer (its _LAYER) with a cell's parameter names: ``weight_ih``
    ``[G*H, I]``, ``weight_hh`` ``[G*H, H]``, ``bias_ih``, ``bias_hh`` (bias=True), and the norms' ``<norm>_weight``,
    ``<norm>_bias`` (the layer's without ``_l0``); the layer's math on one step, fused."""

    _LAYER = None

    def __init__(self, input_size, hidden_size, bias=True, eps=1e-5, zoneout=0.0, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.eps, self.zoneout = float(eps), _check_zoneout(zoneout)
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        G = self._GATES
        self.weight_ih = nn.Parameter(torch.empty(G * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(G * hidden_size, hidden_size, **kw))
        for name in ("bias_ih", "bias_hh"):
            self.register_parameter(name, nn.Parameter(torch.empty(G * hidden_size, **kw)) if bias else None)
        for name, n in self._LAYER._NORMS:
            self.register_parameter(f"{name}_weight", nn.Parameter(torch.empty(n * hidden_size, **kw)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.empty(n * hidden_size, **kw)))
        self.reset_parameters()

    def reset_parameters(self):
        """torch.nn's initialisation of the weights and biases; the norms: weight 1, bias 0."""
        stdv = 1.0 / self.hidden_size ** 0.5 if self.hidden_size > 0 else 0
        for name, param in self.named_parameters():
            if name.startswith("ln_"):
                nn.init.ones_(param) if name.endswith("_weight") else nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -stdv, stdv)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False") + f", eps={self.eps}"
        return s + (f", zoneout={self.zoneout}" if self.zoneout else "")

    def _step(self, input, hx):
        """input [B, I], hx the states [B, H] each: the new states."""
        flat = [self.weight_ih, self.weight_hh] + ([self.bias_ih, self.bias_hh] if self.bias else [])
        ln = [(torch.cat([getattr(self, f"{n}_weight") for n, _ in self._LAYER._NORMS]),
               torch.cat([getattr(self, f"{n}_bias") for n, _ in self._LAYER._NORMS]))]
        given = tuple(h.unsqueeze(0) for h in hx)
        _, *states = self._FN(input.unsqueeze(0), given if len(given) > 1 else given[0], flat, ln,
                              has_biases=self.bias, train=self.training, zoneout=self.zoneout, eps=self.eps)
        return tuple(h[0] for h in states)

    def _batched(self, name, input, hx, states):
        """torch.nn's cell conventions around _step: unbatched input, hx None (zeros)."""
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        hx = tuple(x.new_zeros(x.size(0), self.hidden_size) for _ in range(states)) if hx is None else \
            tuple(h if is_batched else h.unsqueeze(0) for h in hx)
        new = self._step(x, hx)
        return new if is_batched else tuple(h.squeeze(0) for h in new)


class LayerNormLSTMCell(_LayerNormCell):
    """One step of :class:`LayerNormLSTM` (same formulation and keywords ``eps``, ``zoneout``; fused), with a
    cell's parameter names: ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, ``ln_gates_weight``/``_bias``
    ``[4H]``, ``ln_cell_weight``/``_bias`` ``[H]``. forward(input ``[B, I]`` or ``[I]``, hx = (h, c) or None) ->
    (h', c')."""

    _LAYER, _GATES, _FN = LayerNormLSTM, 4, staticmethod(functional.layer_norm_lstm)

    def forward(self, input, hx=None):
        return self._batched("LayerNormLSTMCell", input, hx, 2)


class LayerNormGRUCell(_LayerNormCell):
    """One step of :class:`LayerNormGRU` (same formulation and keywords ``eps``, ``zoneout``; fused), with a
    cell's parameter names: ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, ``ln_input_weight``/``_bias``,
    ``ln_hidden_weight``/``_bias`` ``[3H]``. forward(input ``[B, I]`` or ``[I]``, hx or None) -> h'."""

    _LAYER, _GATES, _FN = LayerNormGRU, 3, staticmethod(functional.layer_norm_gru)

    def forward(self, input, hx=None):
        return self._batched("LayerNormGRUCell", input, None if hx is None else (hx,), 1)[0]


# ---- convert ----------------------------------------------------------------------------------------

_CONVERSIONS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell,
                nn.RNNCell: RNNCell}


def _converted(module):
    """The rnnext equivalent of a torch.nn RNN module, holding the very same Parameter objects."""
    cls = _CONVERSIONS[type(module)]
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    # Same attributes, parameters (shared, not copied), buffers, hooks and training flag.
    new.__dict__.update({k: v for k, v in module.__dict__.items() if k != "_modules"})
    new._modules = module._modules
    if isinstance(new, nn.RNNBase):
        new.state_grad_clip = None
        new._init_flat_weights()
    if isinstance(new, (nn.RNNBase, nn.LSTMCell, nn.GRUCell)):
        new.zoneout = 0.0
    return new


_TORCH = {LSTM: nn.LSTM, GRU: nn.GRU, RNN: nn.RNN, LSTMCell: nn.LSTMCell, GRUCell: nn.GRUCell, RNNCell: nn.RNNCell}
_OURS = (_Layer, LSTMCell, GRUCell, RNNCell, MinimalGRUCell, sLSTMCell, _LayerNormCell)


def _no_torch_equivalent(module):
    """Why torch.nn has no layer that computes what ``module`` (an rnnext module) computes, or None."""
    if type(module) not in _TORCH:
        return type(module).__name__
    options = [f"{k}={getattr(module, k)}" for k in ("zoneout", "state_grad_clip") if getattr(module, k, None)]
    options += [f"num_heads={module.num_heads}"] if getattr(module, "num_heads", 1) > 1 else []
    return f"{type(module).__name__} with {', '.join(options)}" if options else None


def _to_torch(module):
    """The torch.nn equivalent of an rnnext module, holding the very same Parameter objects."""
    cls = _TORCH[type(module)]
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in module.__dict__.items()
                         if k not in ("_modules", "zoneout", "state_grad_clip")})
    new._modules = module._modules
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
    return new


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: replaces, in place, every rnnext LSTM/GRU/RNN and LSTMCell/GRUCell/RNNCell
    inside ``model`` (``model`` itself included) with the torch.nn module, sharing the same Parameter objects (an
    optimizer built before keeps working). Raises, converting nothing, when a module has no torch.nn equivalent
    (MinimalGRU/MinimalGRUCell, the LayerNorm layers and cells, zoneout or state_grad_clip set), naming each.
    Returns the converted model."""
    missing = [f"{name or '<model>'} ({why})" for name, m in model.named_modules() if isinstance(m, _OURS)
               for why in [_no_torch_equivalent(m)] if why]
    if missing:
        raise ValueError("rnnext.to_torch: torch.nn has no equivalent for " + "; ".join(missing))
    if type(model) in _TORCH:
        return _to_torch(model)
    for name, child in list(model.named_children()):
        setattr(model, name, to_torch(child))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replaces, in place, every ``torch.nn`` LSTM/GRU/RNN and LSTMCell/GRUCell/RNNCell inside ``model``
    (``model`` itself included) with the rnnext equivalent, sharing the same Parameter objects, so an
    optimizer built before the conversion keeps working. Subclasses of those modules are left alone
    (their forward may differ). Returns the converted model."""
    if type(model) in _CONVERSIONS:
        return _converted(model)
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child))
    return model
