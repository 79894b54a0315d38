"""Recurrent layers: :class:`RNN` (Elman, tanh or relu), :class:`LSTM` and :class:`GRU`.

Names, shapes, gate orders and initialisation are PyTorch's (``torch.nn.RNN/LSTM/GRU`` with
``batch_first=False``), so weights move both ways through ``state_dict`` unchanged. There is no
autograd: ``forward`` returns a cache and ``backward`` consumes it, accumulating (``+=``)
parameter gradients into ``layer.grads`` like ``loss.backward()`` does into ``.grad``.

Shapes (time-major): x [T, B, I], y [T, B, D*H], state h [D*L, B, H] (LSTM: a tuple (h, c) of
two [D*L, B, H] arrays), with T steps, B batch, I input size, H hidden size, L layers and D = 2
directions for ``bidirectional=True``, else 1.

Bidirectional (PyTorch's layout): every stacked layer k has a forward and a reverse direction,
parameters weight_ih_l{k}... and weight_ih_l{k}_reverse...; y [T, B, 2H] is the forward half
then the reverse half, layers k > 0 take those 2H features as input, and the state's rows are
(layer 0 forward, layer 0 reverse, layer 1 forward, ...). The reverse direction of row b reads
its steps lengths[b]-1 .. 0 (T-1 .. 0 without lengths): it is the forward kernel run over the
input with each row's valid steps reversed in time (one gather), its output reversed back.

Every layer runs on the backend that was current when it was built (``bptt.get_backend()``);
each of its L stacked layers is one forward and one backward kernel call over all T steps per
direction. Where the backend can (``run_beside``: the cpu backend), the two directions of a
bidirectional layer run at once, one thread each.

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
               bottom first (the forward direction)
    projected  the forward got x W_ih^T of the bottom layer (``forward(..., projected=True)``)
    reverse    bidirectional: the reverse direction's backend caches, one per stacked layer
               (their x and y are in reversed time); None for one direction
    order      bidirectional with lengths: the gather index int [T*B] (flat over [T, B]) that
               reverses each row's valid steps in time (its own inverse); None otherwise (a
               plain flip of the time axis)
    """

    __slots__ = ("owner", "T", "B", "layers", "projected", "reverse", "order")

    def __init__(self, owner, T, B, layers, projected=False, reverse=None, order=None):
        self.owner, self.T, self.B, self.layers, self.projected = owner, T, B, layers, projected
        self.reverse, self.order = reverse, order

    def to_dict(self, to_host):
        """Plain dict, readable on any backend: {"T", "B", "projected", "layers": [{"cell",
        "arrays": {field: host array}}], "reverse": like "layers", or None} (backend caches by
        field name, arrays through ``to_host``; the gather index is rebuilt from the lengths).
        :meth:`_RecurrentLayer.cache_from_dict` is the inverse."""
        def saved(caches):
            out = []
            for cache in caches:
                if not isinstance(cache, RecurrentCache):
                    raise TypeError(f"a backend cache of type {type(cache).__name__} is not a "
                                    f"bptt_kernels.host.RecurrentCache and cannot be saved")
                cell, arrays = cache_to_arrays(cache, to_host)
                out.append({"cell": cell, "arrays": arrays})
            return out
        return {"T": self.T, "B": self.B, "projected": self.projected, "layers": saved(self.layers),
                "reverse": None if self.reverse is None else saved(self.reverse)}

    def __repr__(self):
        return (f"LayerCache(owner={self.owner}, T={self.T}, B={self.B}, layers={len(self.layers)}"
                f"{', bidirectional' if self.reverse is not None else ''}"
                f"{', projected' if self.projected else ''})")


def reverse_order(lengths, T, B):
    """The gather index int64 [T*B] (flat over [T, B]) that reverses each row's valid steps:
    step t of row b reads step lengths[b]-1-t for t < lengths[b], else t (padding stays)."""
    t = np.arange(T)[:, None]
    rev = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)       # T,B
    return (rev * B + np.arange(B)[None, :]).ravel()


class _RecurrentLayer:
    """Shared implementation of RNN, LSTM and GRU; the subclass fixes ``cell``."""

    def __init__(self, cell, input_size, hidden_size, num_layers, bias, dtype, seed, bidirectional=False):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
        self.cell = cell
        self.input_size = _checks.expect_int("input_size", input_size, 1)
        self.hidden_size = _checks.expect_int("hidden_size", hidden_size, 1)
        self.num_layers = _checks.expect_int("num_layers", num_layers, 1)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be True or False; got {type(bias).__name__} {bias!r}")
        self.bias = bool(bias)
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise TypeError(f"bidirectional must be True or False; got {type(bidirectional).__name__} "
                            f"{bidirectional!r}")
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if self.bidirectional else 1
        # parameter name suffix per direction (PyTorch's): forward, then reverse
        self._suffixes = ("", "_reverse") if self.bidirectional else ("",)
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
        shapes = {}                                 # PyTorch's state_dict order
        for k in range(self.num_layers):
            in_k = self.input_size if k == 0 else self.num_directions * H
            for suffix in self._suffixes:
                shapes[f"weight_ih_l{k}{suffix}"] = (G * H, in_k)
                shapes[f"weight_hh_l{k}{suffix}"] = (G * H, H)
                if self.bias:
                    shapes[f"bias_ih_l{k}{suffix}"] = (G * H,)
                    shapes[f"bias_hh_l{k}{suffix}"] = (G * H,)
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
            self._scratch_db = {suffix: (self.backend.zeros((G * H,), self.dtype),
                                         self.backend.zeros((G * H,), self.dtype))
                                for suffix in self._suffixes}     # per direction

    # ------------------------------------------------------------------ parameters

    def _layer_params(self, k, suffix=""):
        """(w_ih, w_hh, b_ih, b_hh) of stacked layer k, direction ``suffix`` ("" or "_reverse")
        (zero biases when bias=False)."""
        p = self.params
        if self.bias:
            return tuple(p[f"{name}_l{k}{suffix}"] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        return p[f"weight_ih_l{k}{suffix}"], p[f"weight_hh_l{k}{suffix}"], self._zero_bias, self._zero_bias

    def _layer_grads(self, k, suffix=""):
        """(dw_ih, dw_hh, db_ih, db_hh) of stacked layer k, direction ``suffix`` (scratch bias
        buffers when bias=False)."""
        g = self.grads
        if self.bias:
            return tuple(g[f"{name}_l{k}{suffix}"] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        for buf in self._scratch_db[suffix]:
            buf[...] = 0
        return (g[f"weight_ih_l{k}{suffix}"], g[f"weight_hh_l{k}{suffix}"]) + self._scratch_db[suffix]

    def zero_grad(self):
        """Set every gradient buffer in ``grads`` to zero (in place)."""
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self):
        """Parameters as host numpy copies, PyTorch names and order: weight_ih_l{k} [G*H, I_k],
        ... (bidirectional: then weight_ih_l{k}_reverse ...)."""
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
                           f"(bias={self.bias}, num_layers={self.num_layers}, "
                           f"bidirectional={self.bidirectional}): missing {missing}, "
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
        """Zero state for ``batch_size`` streams: h [D*L, B, H], or (h, c) for LSTM."""
        B = _checks.expect_int("batch_size", batch_size, 1)
        zeros = self._zero_states(B)
        return zeros if self.cell == "lstm" else zeros[0]

    def _zero_states(self, B):
        """A tuple of _n_states zero arrays [D*L, B, H] (what a state or dstate of None means)."""
        shape = (self.num_directions * self.num_layers, B, self.hidden_size)
        return tuple(self.backend.zeros(shape, self.dtype) for _ in range(self._n_states))

    def _state_arrays(self, name, state, B):
        """Validate a user state (h, or (h, c) for LSTM) -> tuple of [D*L, B, H] backend arrays."""
        layout = "[2L, B, H]" if self.bidirectional else "[L, B, H]"
        if self.cell == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{name} of an LSTM must be a tuple (h, c) of two {layout} arrays; "
                                f"got {type(state).__name__}")
            names = (f"{name}[0] (h)", f"{name}[1] (c)")
            parts = state
        else:
            if isinstance(state, (tuple, list)):
                raise TypeError(f"{name} of {type(self).__name__} must be one {layout} array h; "
                                f"got a {type(state).__name__} of {len(state)}")
            names, parts = (name,), (state,)
        out = []
        for part_name, part in zip(names, parts):
            a = _checks.as_float_array(part_name, part, self.dtype, self.backend)
            _checks.expect_shape(part_name, a, (self.num_directions * self.num_layers, B, self.hidden_size),
                                 layout)
            _checks.expect_finite(part_name, a, self.backend)
            out.append(a)
        return tuple(out)

    def _pack_state(self, per_layer):
        """Per-layer (and direction) tuples of [B, H] arrays -> h [D*L, B, H] (or (h, c) for LSTM)."""
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
        state  h [D*L, B, H] (LSTM: (h, c)), or None for zeros; bidirectional: rows ordered
               (layer 0 forward, layer 0 reverse, layer 1 forward, ...)
        lengths  (keyword) integers [B], each in 1..T, in any order: a batch of sequences of
               different lengths, padded to T. Row b runs only its steps t < lengths[b] in
               every stacked layer: y is zero at its padded steps, and its final state is the
               one after its own last step (PyTorch's pack_padded_sequence(x, lengths,
               enforce_sorted=False) through the module, then pad_packed_sequence); the reverse
               direction runs from the row's step lengths[b]-1 down to step 0. x at padded
               steps is not used but must be finite. None: every row runs all T steps.
               :meth:`backward` takes the lengths from the cache.
        projected  x is [T, B, G*H] = x_t weight_ih_l0^T, the bottom layer's input projection
               done by the caller (a language model takes it from a table E weight_ih_l0^T);
               :meth:`backward` then returns dL/d(that) in place of dx and leaves the
               gradient of weight_ih_l0 to the caller. Not with bidirectional (ValueError).
        check_finite  scan x for NaN/inf (ValueError); False for a caller whose x comes out of
               its own finite computation (a model's upper levels, a projected table), where a
               non-finite x would show in that caller's loss anyway
        Returns y [T, B, D*H] (top layer's hidden state after every step; bidirectional: the
        forward half, then the reverse half), the final state (like ``state``), and a
        :class:`LayerCache` for :meth:`backward`.
        """
        if projected and self.bidirectional:
            raise ValueError("projected=True is not available with bidirectional=True: the "
                             "projected input of the bottom layer is the forward direction's only")
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
        order = None
        if self.bidirectional and lengths is not None:
            order = self.backend.asarray(reverse_order(lengths, T, B), np.int64)

        D, H = self.num_directions, self.hidden_size
        caches = [[] for _ in range(D)]                 # per direction: one cache per layer
        finals = []                                     # per (layer, direction): final state
        inp = x
        for k in range(self.num_layers):
            out = None if D == 1 else self.backend.xp.empty((T, B, D * H), self.dtype)  # T,B,2H

            def direction(d, k=k, inp=inp, out=out):
                w_ih, w_hh, b_ih, b_hh = self._layer_params(k, self._suffixes[d])
                if k == 0 and projected:
                    w_ih = None                                         # inp is x W_ih^T
                # the reverse direction: the forward kernel over each row's steps reversed
                inp_d = inp if d == 0 else self._reverse_steps(inp, order)
                layer_state = tuple(s[D * k + d] for s in states)       # each [B, H]
                if lengths is None:                                     # every row all T steps
                    y_d, final, cache = self._forward_kernel(inp_d, layer_state, w_ih, w_hh, b_ih, b_hh)
                else:                                                   # every level the same
                    y_d, final, cache = self._forward_kernel(inp_d, layer_state, w_ih, w_hh, b_ih, b_hh,
                                                             lengths=lengths)
                if out is not None:                                     # its half of y, forward time
                    out[..., d * H:(d + 1) * H] = y_d if d == 0 else self._reverse_steps(y_d, order)
                return y_d, final, cache

            for d, (y_d, final, cache) in enumerate(self._each_direction(direction, T, B, k)):
                caches[d].append(cache)
                finals.append(final)
            inp = y_d if D == 1 else out                                # T,B,D*H
        y = inp
        if self.backend.xp is np:
            y = y.view()
            y.flags.writeable = False               # the cache holds y: no in-place changes
        return y, self._pack_state(finals), LayerCache(self.layer_id, T, B, caches[0], bool(projected),
                                                       caches[1] if self.bidirectional else None, order)

    def _each_direction(self, direction, T, B, k):
        """[direction(d) for d in range(D)] for stacked layer k over T steps and B rows: both
        at once where the backend can run two independent kernel calls side by side
        (``run_beside``: the cpu backend, each on its own thread), else one after the other."""
        if self.num_directions == 1:
            return [direction(0)]
        run_beside = getattr(self.backend, "run_beside", None)
        if run_beside is None:
            return [direction(0), direction(1)]
        G, H = GATES[self.cell], self.hidden_size
        in_k = self.input_size if k == 0 else 2 * H
        return list(run_beside(lambda: direction(0), lambda: direction(1),
                               T * B * G * H * (in_k + H)))     # multiply-adds of one forward

    def _reverse_steps(self, a, order):
        """a [T, B, F] with each row's valid steps reversed in time: a gather by ``order``
        (:func:`reverse_order`, its own inverse), or a flip of the time axis where ``order`` is
        None (every row all T steps). Returns a new C-contiguous array."""
        if order is None:
            return self.backend.xp.ascontiguousarray(a[::-1])
        T, B = a.shape[:2]
        return self.backend.xp.take(a.reshape(T * B, -1), order, axis=0).reshape(a.shape)

    def backward(self, dy, cache, dstate=None, t_start=0, return_dh=False, check_finite=True, *, t_origin=0):
        """Backpropagate through the steps t_start .. T-1 of a forward call.

        dy        [T, B, D*H] dL/dy
        cache     the :class:`LayerCache` that this layer's forward returned (or
                  :meth:`cache_from_dict` rebuilt); a forward with ``lengths`` left them in
                  it: padded steps give no gradient (dy there is ignored, dx and dh there are
                  zero) and dstate reaches each row's own last step
        dstate    dL/d(final state), like ``state``; None for zeros
        t_start   0 <= t_start < T: the gradient is cut at the state entering step t_start
                  (as if the forward had started there from a detached state). Bidirectional:
                  only 0 (ValueError otherwise), since the reverse direction enters step
                  t_start last, from the steps after it, and has no state to cut there
        check_finite  scan dy for NaN/inf (ValueError); False for a caller that checked it
        t_origin  the stream's step of step 0: the gradient sums over time run in the fixed time
                  blocks of ``bptt_kernels.host.blocks``, so a sequence backpropagated in calls
                  that meet at block boundaries gets the gradients of one call bit for bit
                  (reference and cpu backends; ``bptt.memory`` relies on it)
        Accumulates (+=) into ``grads``. Returns dx [T, B, I] (rows t < t_start are zero; after a
        ``forward(..., projected=True)``, dL/d(x W_ih^T) [T, B, G*H], and weight_ih_l0's
        gradient is left to the caller) and
        dL/d(state entering step t_start), like ``state``; with ``return_dh=True`` also dh, a
        list of one [T, B, D*H] array per layer (bottom first): the total dL/dh_t of every step
        (bidirectional: the forward half, then the reverse half, both in forward time).
        """
        if not isinstance(cache, LayerCache):
            raise TypeError(f"cache must be the LayerCache returned by this layer's forward; "
                            f"got {type(cache).__name__}")
        if cache.owner != self.layer_id:
            raise ValueError(f"cache was made by another layer (layer_id {cache.owner}); "
                             f"this {type(self).__name__} has layer_id {self.layer_id}")
        T, B, D, H = cache.T, cache.B, self.num_directions, self.hidden_size
        dy = _checks.as_float_array("dy", dy, self.dtype, self.backend)
        _checks.expect_shape("dy", dy, (T, B, D * H), f"[T, B, {'2H' if D == 2 else 'H'}] (like y)")
        if check_finite:
            _checks.expect_finite("dy", dy, self.backend)
        t_start = _checks.expect_int("t_start", t_start, 0, T - 1)
        t_origin = _checks.expect_int("t_origin", t_origin, 0)
        if t_start and self.bidirectional:
            raise ValueError(f"t_start must be 0 for a bidirectional layer; got {t_start} (the reverse "
                             f"direction reaches step t_start from the later steps: there is no state "
                             f"entering t_start to cut the gradient at)")
        dstates = self._zero_states(B) if dstate is None else self._state_arrays("dstate", dstate, B)

        xp = self.backend.xp
        dinit = [None] * (D * self.num_layers)
        dh_all = [None] * self.num_layers
        d_out = dy                                  # dL/d(output of layer k), [T, B, D*H]
        for k in reversed(range(self.num_layers)):
            def direction(d, k=k, d_out=d_out):
                suffix = self._suffixes[d]
                w_ih, w_hh, _, _ = self._layer_params(k, suffix)
                dw_ih, dw_hh, db_ih, db_hh = self._layer_grads(k, suffix)
                if k == 0 and cache.projected:
                    w_ih = dw_ih = None                                 # dx: dL/d(x W_ih^T)
                dy_d = d_out[..., d * H:(d + 1) * H] if D == 2 else d_out
                if d == 1:                                              # into reversed time
                    dy_d = self._reverse_steps(dy_d, cache.order)
                dx_d, dinit_d, dh_d = self._backward_kernel(
                    dy_d, tuple(s[D * k + d] for s in dstates), (cache.layers, cache.reverse)[d][k],
                    w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=t_start,
                    t_origin=t_origin if d == 0 else 0)
                if d == 1:                                              # back to forward time
                    dx_d = self._reverse_steps(dx_d, cache.order)
                    dh_d = self._reverse_steps(dh_d, cache.order) if return_dh else None
                return dx_d, dinit_d, dh_d

            dxs, dinit[D * k:D * (k + 1)], dhs = zip(*self._each_direction(direction, T, B, k))
            d_out = dxs[0] if D == 1 else xp.add(dxs[0], dxs[1], out=dxs[0])   # both directions read x
            if return_dh:
                dh_all[k] = dhs[0] if D == 1 else xp.concatenate(dhs, axis=2)
        dx = d_out
        if return_dh:
            return dx, self._pack_state(dinit), dh_all
        return dx, self._pack_state(dinit)

    def cache_from_dict(self, d):
        """The :class:`LayerCache` of ``LayerCache.to_dict``'s dict ``d`` (saved on any backend),
        on this layer's backend and owned by this layer."""
        T, B = _checks.expect_int("T", d["T"], 1), _checks.expect_int("B", d["B"], 1)
        reverse = d.get("reverse")
        if (reverse is not None) != self.bidirectional:
            raise ValueError(f"the cache is of a {'bidirectional' if reverse is not None else 'one-direction'} "
                             f"layer; this {type(self).__name__} has bidirectional={self.bidirectional}")
        directions = [self._caches_from_dicts(d["layers"], T, B)]
        if reverse is not None:
            directions.append(self._caches_from_dicts(reverse, T, B, " (reverse)"))
        lengths = directions[0][0].lengths
        order = (None if reverse is None or lengths is None
                 else self.backend.asarray(reverse_order(lengths, T, B), np.int64))
        return LayerCache(self.layer_id, T, B, directions[0], bool(d["projected"]),
                          directions[1] if reverse is not None else None, order)

    def _caches_from_dicts(self, layers, T, B, direction=""):
        """Backend caches of one direction from their dicts, checked against this layer."""
        if len(layers) != self.num_layers:
            raise ValueError(f"the cache holds {len(layers)} stacked layers{direction}; this "
                             f"{type(self).__name__} has {self.num_layers}")
        caches = []
        for k, layer in enumerate(layers):
            if layer["cell"] != self.cell:
                raise ValueError(f"the cache of stacked layer {k}{direction} is of a {layer['cell']!r} cell; "
                                 f"this layer is {self.cell!r}")
            y = layer["arrays"].get("y")
            if y is not None and tuple(y.shape) != (T, B, self.hidden_size):
                raise ValueError(f"the cache of stacked layer {k}{direction} holds y of shape {tuple(y.shape)}; "
                                 f"this layer needs {(T, B, self.hidden_size)}")
            caches.append(cache_from_arrays(layer["cell"], layer["arrays"],
                                            lambda a: device_copy(self.backend, a)))
        return caches

    def __repr__(self):
        extra = f", nonlinearity={self.cell[4:]!r}" if self.cell.startswith("rnn") else ""
        bidirectional = ", bidirectional=True" if self.bidirectional else ""
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}{extra}, bias={self.bias}{bidirectional}, "
                f"dtype={self.dtype.name}, backend={self.backend.NAME!r})")


class RNN(_RecurrentLayer):
    """Elman RNN: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act = tanh or relu.

    Parameters per layer k: weight_ih_l{k} [H, I_k], weight_hh_l{k} [H, H], bias_ih_l{k} [H],
    bias_hh_l{k} [H] (I_0 = input_size, I_k = D*H above; bidirectional: the same again with the
    suffix ``_reverse``). ``cell`` is "rnn_tanh" or "rnn_relu".
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 dtype=np.float32, seed=None, bidirectional=False):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, dtype, seed,
                         bidirectional)


class LSTM(_RecurrentLayer):
    """LSTM with gates (i, f, g, o): c_t = f*c_{t-1} + i*g, h_t = o*tanh(c_t).

    Parameters per layer k: weight_ih_l{k} [4H, I_k], weight_hh_l{k} [4H, H], bias_ih_l{k} [4H],
    bias_hh_l{k} [4H] (bidirectional: the same again with the suffix ``_reverse``). State is a
    tuple (h [D*L, B, H], c [D*L, B, H]).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, dtype=np.float32, seed=None,
                 bidirectional=False):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, dtype, seed, bidirectional)


class GRU(_RecurrentLayer):
    """GRU with gates (r, z, n), PyTorch's variant: n = tanh(W_in x + b_in + r*(W_hn h + b_hn)),
    h_t = (1-z)*n + z*h_{t-1}.

    Parameters per layer k: weight_ih_l{k} [3H, I_k], weight_hh_l{k} [3H, H], bias_ih_l{k} [3H],
    bias_hh_l{k} [3H] (bidirectional: the same again with the suffix ``_reverse``).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, dtype=np.float32, seed=None,
                 bidirectional=False):
        super().__init__("gru", input_size, hidden_size, num_layers, bias, dtype, seed, bidirectional)
