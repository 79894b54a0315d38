"""Recurrent layers: :class:`RNN` (Elman, tanh or relu), :class:`LSTM` and :class:`GRU`.

Names, shapes, gate orders and initialisation are PyTorch's (``torch.nn.RNN/LSTM/GRU`` with
``batch_first=False``), so weights move both ways through ``state_dict`` unchanged. There is no
autograd: ``forward`` returns a cache and ``backward`` consumes it, accumulating (``+=``)
parameter gradients into ``layer.grads`` like ``loss.backward()`` does into ``.grad``.

Shapes (time-major): x [T, B, I], y [T, B, H], state h [L, B, H] (LSTM: a tuple (h, c) of two
[L, B, H] arrays), with T steps, B batch, I input size, H hidden size, L layers.

Every layer runs on the backend that was current when it was built (``bptt.get_backend()``);
each of its L stacked layers is one forward and one backward kernel call over all T steps.

Ownership: the cache keeps ``x`` and the kernels' activations by reference until ``backward``;
do not modify ``x`` in place in between. On NumPy backends ``y`` is returned read-only, since
the cache holds it too (an in-place change would silently corrupt the gradient).
"""

import itertools
import math

import numpy as np

from bptt import _checks
from bptt.backend import get_backend
from bptt_kernels import CELLS, GATES
from bptt_kernels.host import RecurrentCache, as_lengths, cache_from_arrays, cache_to_arrays

_layer_ids = itertools.count(1)


def host_copy(backend, a):
    """A fresh host ``numpy.ndarray`` copy of the device array ``a`` (never an alias)."""
    return np.array(backend.to_host(a), copy=True)


def device_copy(backend, a):
    """A fresh device array of ``backend`` holding the host array ``a`` (same dtype, never an alias)."""
    a = np.asarray(a)
    return backend.asarray(np.array(a, copy=True), a.dtype)


class LayerCache:
    """What :meth:`forward` saved for :meth:`backward`.

    owner      id of the layer that made it (``layer.layer_id``)
    T, B       time steps and batch size of the forward call
    layers     one backend cache (:class:`bptt_kernels.host.RecurrentCache`) per stacked layer,
               bottom first
    projected  the forward got x W_ih^T of the bottom layer (``forward(..., projected=True)``)
    """

    __slots__ = ("owner", "T", "B", "layers", "projected")

    def __init__(self, owner, T, B, layers, projected=False):
        self.owner, self.T, self.B, self.layers, self.projected = owner, T, B, layers, projected

    def to_dict(self, to_host):
        """Plain dict, readable on any backend: {"T", "B", "projected", "layers": [{"cell",
        "arrays": {field: host array}}]} (backend caches by field name, arrays through
        ``to_host``). :meth:`_RecurrentLayer.cache_from_dict` is the inverse."""
        layers = []
        for cache in self.layers:
            if not isinstance(cache, RecurrentCache):
                raise TypeError(f"a backend cache of type {type(cache).__name__} is not a "
                                f"bptt_kernels.host.RecurrentCache and cannot be saved")
            cell, arrays = cache_to_arrays(cache, to_host)
            layers.append({"cell": cell, "arrays": arrays})
        return {"T": self.T, "B": self.B, "projected": self.projected, "layers": layers}

    def __repr__(self):
        return (f"LayerCache(owner={self.owner}, T={self.T}, B={self.B}, layers={len(self.layers)}"
                f"{', projected' if self.projected else ''})")


class _RecurrentLayer:
    """Shared implementation of RNN, LSTM and GRU; the subclass fixes ``cell``."""

    def __init__(self, cell, input_size, hidden_size, num_layers, bias, dtype, seed):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
        self.cell = cell
        self.input_size = _checks.expect_int("input_size", input_size, 1)
        self.hidden_size = _checks.expect_int("hidden_size", hidden_size, 1)
        self.num_layers = _checks.expect_int("num_layers", num_layers, 1)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be True or False; got {type(bias).__name__} {bias!r}")
        self.bias = bool(bias)
        self.backend = get_backend()
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a numpy float dtype; got {dtype!r}") from None
        if self.dtype not in self.backend.DTYPES:
            raise TypeError(f"dtype {self.dtype.name} is not supported by backend "
                            f"{self.backend.NAME!r}; supported: "
                            f"{', '.join(np.dtype(d).name for d in self.backend.DTYPES)}")
        self.layer_id = next(_layer_ids)
        self._forward_kernel = getattr(self.backend, f"{cell}_forward")
        self._backward_kernel = getattr(self.backend, f"{cell}_backward")
        self._n_states = 2 if cell == "lstm" else 1   # (h, c) for LSTM, h otherwise

        G, H = GATES[cell], self.hidden_size
        shapes = {}
        for k in range(self.num_layers):
            in_k = self.input_size if k == 0 else H
            shapes[f"weight_ih_l{k}"] = (G * H, in_k)
            shapes[f"weight_hh_l{k}"] = (G * H, H)
            if self.bias:
                shapes[f"bias_ih_l{k}"] = (G * H,)
                shapes[f"bias_hh_l{k}"] = (G * H,)
        self._shapes = shapes

        # PyTorch's initialisation: every parameter ~ uniform(-1/sqrt(H), 1/sqrt(H)).
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(H)
        self.params = {name: self.backend.asarray(rng.uniform(-bound, bound, shape), self.dtype)
                       for name, shape in shapes.items()}
        self.grads = {name: self.backend.zeros(shape, self.dtype) for name, shape in shapes.items()}
        if not self.bias:
            # bias=False: the kernels get zero biases and throw-away bias-gradient buffers
            self._zero_bias = self.backend.zeros((G * H,), self.dtype)
            self._scratch_db = (self.backend.zeros((G * H,), self.dtype),
                                self.backend.zeros((G * H,), self.dtype))

    # ------------------------------------------------------------------ parameters

    def _layer_params(self, k):
        """(w_ih, w_hh, b_ih, b_hh) of stacked layer k (zero biases when bias=False)."""
        p = self.params
        if self.bias:
            return p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"], p[f"bias_ih_l{k}"], p[f"bias_hh_l{k}"]
        return p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"], self._zero_bias, self._zero_bias

    def _layer_grads(self, k):
        """(dw_ih, dw_hh, db_ih, db_hh) of stacked layer k (scratch bias buffers when bias=False)."""
        g = self.grads
        if self.bias:
            return g[f"weight_ih_l{k}"], g[f"weight_hh_l{k}"], g[f"bias_ih_l{k}"], g[f"bias_hh_l{k}"]
        for buf in self._scratch_db:
            buf[...] = 0
        return (g[f"weight_ih_l{k}"], g[f"weight_hh_l{k}"]) + self._scratch_db

    def zero_grad(self):
        """Set every gradient buffer in ``grads`` to zero (in place)."""
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self):
        """Parameters as host numpy copies, PyTorch names: weight_ih_l{k} [G*H, I_k], ..."""
        return {name: np.array(self.backend.to_host(p), copy=True) for name, p in self.params.items()}

    def load_state_dict(self, state_dict):
        """Copy parameters in from ``state_dict`` (name -> array-like, e.g. a torch state_dict).

        The names must be exactly ``params``' names and every shape must match; nothing is
        changed unless all entries are valid. Values are converted to the layer dtype.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping name -> array; got {type(state_dict).__name__}")
        missing = [n for n in self._shapes if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self._shapes]
        if missing or unexpected:
            raise ValueError(f"state_dict names do not match this {type(self).__name__} "
                           f"(bias={self.bias}, num_layers={self.num_layers}): missing {missing}, "
                           f"unexpected {unexpected}")
        new = {}
        for name, shape in self._shapes.items():
            a = _checks.as_float_array(f"state_dict[{name!r}]", state_dict[name], self.dtype, self.backend)
            _checks.expect_shape(f"state_dict[{name!r}]", a, shape, "")
            _checks.expect_finite(f"state_dict[{name!r}]", a, self.backend)
            new[name] = a
        for name, a in new.items():
            self.params[name][...] = a

    # ------------------------------------------------------------------ state

    def init_state(self, batch_size):
        """Zero state for ``batch_size`` streams: h [L, B, H], or (h, c) for LSTM."""
        B = _checks.expect_int("batch_size", batch_size, 1)
        zeros = self._zero_states(B)
        return zeros if self.cell == "lstm" else zeros[0]

    def _zero_states(self, B):
        """A tuple of _n_states zero arrays [L, B, H] (what a state or dstate of None means)."""
        shape = (self.num_layers, B, self.hidden_size)
        return tuple(self.backend.zeros(shape, self.dtype) for _ in range(self._n_states))

    def _state_arrays(self, name, state, B):
        """Validate a user state (h, or (h, c) for LSTM) -> tuple of [L, B, H] backend arrays."""
        if self.cell == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{name} of an LSTM must be a tuple (h, c) of two [L, B, H] arrays; "
                                f"got {type(state).__name__}")
            names = (f"{name}[0] (h)", f"{name}[1] (c)")
            parts = state
        else:
            if isinstance(state, (tuple, list)):
                raise TypeError(f"{name} of {type(self).__name__} must be one [L, B, H] array h; "
                                f"got a {type(state).__name__} of {len(state)}")
            names, parts = (name,), (state,)
        out = []
        for part_name, part in zip(names, parts):
            a = _checks.as_float_array(part_name, part, self.dtype, self.backend)
            _checks.expect_shape(part_name, a, (self.num_layers, B, self.hidden_size), "[L, B, H]")
            _checks.expect_finite(part_name, a, self.backend)
            out.append(a)
        return tuple(out)

    def _pack_state(self, per_layer):
        """Per-layer tuples of [B, H] arrays -> h [L, B, H] (or (h, c) for LSTM)."""
        if len(per_layer) == 1:          # one layer: a copy with a new axis (np.stack: ~4x slower)
            packed = tuple(s[None].copy() for s in per_layer[0])
        else:
            xp = self.backend.xp
            packed = tuple(xp.stack([s[i] for s in per_layer]) for i in range(self._n_states))
        return packed if self.cell == "lstm" else packed[0]

    # ------------------------------------------------------------------ forward / backward

    def forward(self, x, state=None, projected=False, check_finite=True, *, lengths=None):
        """Run all layers over T steps.

        x      [T, B, I] float array-like (converted to the layer dtype)
        state  h [L, B, H] (LSTM: (h, c)), or None for zeros
        lengths  (keyword) integers [B], each in 1..T, in any order: a batch of sequences of
               different lengths, padded to T. Row b runs only its steps t < lengths[b] in
               every stacked layer: y is zero at its padded steps, and its final state is the
               one after its own last step (PyTorch's pack_padded_sequence(x, lengths,
               enforce_sorted=False) through the module, then pad_packed_sequence). x at
               padded steps is not used but must be finite. None: every row runs all T steps.
               :meth:`backward` takes the lengths from the cache. (Not on the cupy and cuda
               backends yet: NotImplementedError there.)
        projected  x is [T, B, G*H] = x_t weight_ih_l0^T, the bottom layer's input projection
               done by the caller (a language model takes it from a table E weight_ih_l0^T);
               :meth:`backward` then returns dL/d(that) in place of dx and leaves the
               gradient of weight_ih_l0 to the caller
        check_finite  scan x for NaN/inf (ValueError); False for a caller whose x comes out of
               its own finite computation (a model's upper levels, a projected table), where a
               non-finite x would show in that caller's loss anyway
        Returns y [T, B, H] (top layer's hidden state after every step), the final state
        (like ``state``), and a :class:`LayerCache` for :meth:`backward`.
        """
        x = _checks.as_float_array("x", x, self.dtype, self.backend)
        _checks.expect_ndim("x", x, 3, "[T, B, I]")
        T, B, I = x.shape
        width, what = ((GATES[self.cell] * self.hidden_size, "G*H (projected=True)") if projected
                       else (self.input_size, "input_size"))
        if I != width:
            raise ValueError(f"x must have shape [T, B, I] with I = {what} = {width}; "
                             f"got {_checks.describe(x)}")
        if T < 1 or B < 1:
            raise ValueError(f"x must have at least one time step and one batch row; got {_checks.describe(x)}")
        if check_finite:
            _checks.expect_finite("x", x, self.backend)
        states = self._zero_states(B) if state is None else self._state_arrays("state", state, B)
        lengths = as_lengths("lengths", lengths, T, B)     # host int64 [B] or None

        caches, finals = [], []
        inp = x
        for k in range(self.num_layers):
            layer_state = tuple(s[k] for s in states)                   # each [B, H]
            w_ih, w_hh, b_ih, b_hh = self._layer_params(k)
            if k == 0 and projected:
                w_ih = None                                             # inp is x W_ih^T
            if lengths is None:                                         # every row all T steps
                inp, final, cache = self._forward_kernel(inp, layer_state, w_ih, w_hh, b_ih, b_hh)
            else:                                                       # every level the same
                inp, final, cache = self._forward_kernel(inp, layer_state, w_ih, w_hh, b_ih, b_hh,
                                                         lengths=lengths)
            caches.append(cache)
            finals.append(final)
        y = inp
        if self.backend.xp is np:
            y = y.view()
            y.flags.writeable = False               # the cache holds y: no in-place changes
        return y, self._pack_state(finals), LayerCache(self.layer_id, T, B, caches, bool(projected))

    def backward(self, dy, cache, dstate=None, t_start=0, return_dh=False, check_finite=True):
        """Backpropagate through the steps t_start .. T-1 of a forward call.

        dy        [T, B, H] dL/dy
        cache     the :class:`LayerCache` that this layer's forward returned (or
                  :meth:`cache_from_dict` rebuilt); a forward with ``lengths`` left them in
                  it: padded steps give no gradient (dy there is ignored, dx and dh there are
                  zero) and dstate reaches each row's own last step
        dstate    dL/d(final state), like ``state``; None for zeros
        t_start   0 <= t_start < T: the gradient is cut at the state entering step t_start
                  (as if the forward had started there from a detached state)
        check_finite  scan dy for NaN/inf (ValueError); False for a caller that checked it
        Accumulates (+=) into ``grads``. Returns dx [T, B, I] (rows t < t_start are zero; after a
        ``forward(..., projected=True)``, dL/d(x W_ih^T) [T, B, G*H], and weight_ih_l0's
        gradient is left to the caller) and
        dL/d(state entering step t_start), like ``state``; with ``return_dh=True`` also dh, a
        list of one [T, B, H] array per layer (bottom first): the total dL/dh_t of every step.
        """
        if not isinstance(cache, LayerCache):
            raise TypeError(f"cache must be the LayerCache returned by this layer's forward; "
                            f"got {type(cache).__name__}")
        if cache.owner != self.layer_id:
            raise ValueError(f"cache was made by another layer (layer_id {cache.owner}); "
                             f"this {type(self).__name__} has layer_id {self.layer_id}")
        T, B = cache.T, cache.B
        dy = _checks.as_float_array("dy", dy, self.dtype, self.backend)
        _checks.expect_shape("dy", dy, (T, B, self.hidden_size), "[T, B, H] (like y)")
        if check_finite:
            _checks.expect_finite("dy", dy, self.backend)
        t_start = _checks.expect_int("t_start", t_start, 0, T - 1)
        dstates = self._zero_states(B) if dstate is None else self._state_arrays("dstate", dstate, B)

        dinit = [None] * self.num_layers
        dh_all = [None] * self.num_layers
        d_out = dy                                  # dL/d(output of layer k), [T, B, H]
        for k in reversed(range(self.num_layers)):
            w_ih, w_hh, _, _ = self._layer_params(k)
            dw_ih, dw_hh, db_ih, db_hh = self._layer_grads(k)
            if k == 0 and cache.projected:
                w_ih = dw_ih = None                                     # dx: dL/d(x W_ih^T)
            d_out, dinit[k], dh_all[k] = self._backward_kernel(
                d_out, tuple(s[k] for s in dstates), cache.layers[k], w_ih, w_hh,
                dw_ih, dw_hh, db_ih, db_hh, t_start=t_start)
        dx = d_out
        if return_dh:
            return dx, self._pack_state(dinit), dh_all
        return dx, self._pack_state(dinit)

    def cache_from_dict(self, d):
        """The :class:`LayerCache` of ``LayerCache.to_dict``'s dict ``d`` (saved on any backend),
        on this layer's backend and owned by this layer."""
        T, B, layers = _checks.expect_int("T", d["T"], 1), _checks.expect_int("B", d["B"], 1), d["layers"]
        if len(layers) != self.num_layers:
            raise ValueError(f"the cache holds {len(layers)} stacked layers; this {type(self).__name__} "
                             f"has {self.num_layers}")
        caches = []
        for k, layer in enumerate(layers):
            if layer["cell"] != self.cell:
                raise ValueError(f"the cache of stacked layer {k} is of a {layer['cell']!r} cell; this layer "
                                 f"is {self.cell!r}")
            y = layer["arrays"].get("y")
            if y is not None and tuple(y.shape) != (T, B, self.hidden_size):
                raise ValueError(f"the cache of stacked layer {k} holds y of shape {tuple(y.shape)}; "
                                 f"this layer needs {(T, B, self.hidden_size)}")
            caches.append(cache_from_arrays(layer["cell"], layer["arrays"],
                                            lambda a: device_copy(self.backend, a)))
        return LayerCache(self.layer_id, T, B, caches, bool(d["projected"]))

    def __repr__(self):
        extra = f", nonlinearity={self.cell[4:]!r}" if self.cell.startswith("rnn") else ""
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}{extra}, bias={self.bias}, dtype={self.dtype.name}, "
                f"backend={self.backend.NAME!r})")


class RNN(_RecurrentLayer):
    """Elman RNN: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act = tanh or relu.

    Parameters per layer k: weight_ih_l{k} [H, I_k], weight_hh_l{k} [H, H], bias_ih_l{k} [H],
    bias_hh_l{k} [H] (I_0 = input_size, I_k = H above). ``cell`` is "rnn_tanh" or "rnn_relu".
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 dtype=np.float32, seed=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, dtype, seed)


class LSTM(_RecurrentLayer):
    """LSTM with gates (i, f, g, o): c_t = f*c_{t-1} + i*g, h_t = o*tanh(c_t).

    Parameters per layer k: weight_ih_l{k} [4H, I_k], weight_hh_l{k} [4H, H], bias_ih_l{k} [4H],
    bias_hh_l{k} [4H]. State is a tuple (h [L, B, H], c [L, B, H]).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, dtype=np.float32, seed=None):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, dtype, seed)


class GRU(_RecurrentLayer):
    """GRU with gates (r, z, n), PyTorch's variant: n = tanh(W_in x + b_in + r*(W_hn h + b_hn)),
    h_t = (1-z)*n + z*h_{t-1}.

    Parameters per layer k: weight_ih_l{k} [3H, I_k], weight_hh_l{k} [3H, H], bias_ih_l{k} [3H],
    bias_hh_l{k} [3H].
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, dtype=np.float32, seed=None):
        super().__init__("gru", input_size, hidden_size, num_layers, bias, dtype, seed)
