"""The recurrent stack that both models (:mod:`bptt.models`) are built on.

One single-level recurrent layer per level (``model.layers``), inverted dropout between levels
(masks from the model's ``numpy.random.Generator``, kept in the cache), the stacked state
h [D*L,B,H] (LSTM: (h, c)) split into and joined from per-level states, parameter bookkeeping
under PyTorch's names (``rnn.weight_ih_l{k}``..., bidirectional also
``rnn.weight_ih_l{k}_reverse``...), ``state_dict``/``load_state_dict`` and the linear output
map. Shapes: T steps, B batch, I input size, H hidden size, L levels, D directions (2 for a
bidirectional stack, else 1).

The interface a model uses (``RecurrentModelBase``):

* ``rng = self._init_stack(cell, input_size, hidden_size, num_layers, dropout, dtype, seed,
  bidirectional=False)`` builds the levels and sets ``cell``, ``hidden_size``, ``num_layers``,
  ``dropout``, ``dtype``, ``backend``, ``bidirectional``, ``num_directions`` (D), ``layers``,
  ``params``/``grads`` (``rnn.*``); it returns the Generator for the model's own parameters.
  Levels above the first take the D*H features of the level below.
* ``y, final, stack_cache = self._stack_forward(x, state, train, projected=False, lengths=None)``:
  x [T,B,I], state h [D*L,B,H] (LSTM (h, c)) or None, lengths host ints [B] in 1..T or None;
  y [T,B,D*H] (forward half, then reverse half). projected=True: not with bidirectional.
* ``dx, dinit, dh = self._stack_backward(dy, stack_cache, dstate, t_start)``: dy [T,B,D*H],
  dstate like state (or None), dh one [T,B,D*H] per level; the lengths come from the cache;
  bidirectional needs t_start == 0 (ValueError otherwise).
* ``self.init_state(B)``: zeros [D*L,B,H] (LSTM (h, c)).
"""

import math

import numpy as np

from bptt import _checks
from bptt.backend import get_backend
from bptt.layers import GRU, LSTM, RNN, device_copy
from bptt_kernels import CELLS
from bptt_kernels.host.blocks import time_blocks


class NonFiniteGradientError(FloatingPointError):
    """A gradient flowing back through a model became NaN or inf."""


def make_layer(cell, input_size, hidden_size, dtype, seed, bidirectional=False):
    """One single-level recurrent layer of ``cell`` ("lstm", "gru", "rnn_tanh", "rnn_relu"),
    with a reverse direction where ``bidirectional``."""
    kw = dict(dtype=dtype, seed=seed, bidirectional=bidirectional)
    if cell == "lstm":
        return LSTM(input_size, hidden_size, 1, **kw)
    if cell == "gru":
        return GRU(input_size, hidden_size, 1, **kw)
    if cell in ("rnn_tanh", "rnn_relu"):
        return RNN(input_size, hidden_size, 1, nonlinearity=cell[4:], **kw)
    raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")


def check_dropout(dropout):
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
    return float(dropout)


def json_seed(seed):
    """The seed as recorded in ``config``: an int, or None when not an int (a Generator...)."""
    return int(seed) if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else None


def check_finite_grad(xp, a, where):
    if not bool(xp.isfinite(a).all()):
        raise NonFiniteGradientError(f"the gradient at {where} contains NaN or inf")


def host_or_none(to_host, a):
    return None if a is None else to_host(a)


class StackCache:
    """Saved by the recurrent stack's forward: one layer cache per level and the dropout masks
    applied to the input of levels 1..L-1 (None where no dropout was applied)."""

    __slots__ = ("layers", "masks")

    def __init__(self, layers, masks):
        self.layers, self.masks = layers, masks

    def to_dict(self, to_host):
        """{"layers": [LayerCache dict per level], "masks": [host array or None]}."""
        return {"layers": [c.to_dict(to_host) for c in self.layers],
                "masks": [host_or_none(to_host, m) for m in self.masks]}


class RecurrentModelBase:
    """What both models share: the recurrent stack, dropout, parameter bookkeeping, state_dict."""

    def _init_stack(self, cell, input_size, hidden_size, num_layers, dropout, dtype, seed, bidirectional=False):
        """Build the levels (see the module docstring); returns the Generator for the model's
        own parameters."""
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
        self.cell = cell
        self.hidden_size = _checks.expect_int("hidden_size", hidden_size, 1)
        self.num_layers = _checks.expect_int("num_layers", num_layers, 1)
        self.dropout = check_dropout(dropout)
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise TypeError(f"bidirectional must be True or False; got {type(bidirectional).__name__} "
                            f"{bidirectional!r}")
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if self.bidirectional else 1
        self.dtype = np.dtype(dtype)
        self.backend = get_backend()
        if self.dtype not in self.backend.DTYPES:
            raise TypeError(f"dtype {self.dtype.name} is not supported by backend {self.backend.NAME!r}")
        seeds = np.random.SeedSequence(seed)
        init_seed, dropout_seed, *layer_seeds = seeds.spawn(2 + self.num_layers)
        self.rng = np.random.default_rng(dropout_seed)        # dropout masks
        self.dropout_rows = None    # (B, r0, r1): a forward holds rows r0..r1-1 of a batch of B (_dropout)
        self.replay = None          # a bptt.memory.Replay while a part of an earlier forward call is rerun
        self.layers = [make_layer(cell, input_size if k == 0 else self.num_directions * self.hidden_size,
                                  self.hidden_size, self.dtype, layer_seeds[k], self.bidirectional)
                       for k in range(self.num_layers)]
        self.params, self.grads = {}, {}
        for k, layer in enumerate(self.layers):
            for name in layer.params:       # weight_ih_l0 (weight_ih_l0_reverse) ... of level k
                public = "rnn." + name.replace("_l0", f"_l{k}")
                self.params[public] = layer.params[name]
                self.grads[public] = layer.grads[name]
        return np.random.default_rng(init_seed)

    def _device_or_none(self, a):
        return None if a is None else device_copy(self.backend, a)

    def _stack_cache_from_dict(self, d):
        """The StackCache of ``StackCache.to_dict``'s dict, owned by this model's layers."""
        if len(d["layers"]) != self.num_layers or len(d["masks"]) != self.num_layers - 1:
            raise ValueError(f"the cache holds {len(d['layers'])} recurrent levels; this model has {self.num_layers}")
        return StackCache([layer.cache_from_dict(c) for layer, c in zip(self.layers, d["layers"])],
                          [self._device_or_none(m) for m in d["masks"]])

    def _add_param(self, name, host_value):
        self.params[name] = self.backend.asarray(host_value, self.dtype)
        self.grads[name] = self.backend.zeros(self.params[name].shape, self.dtype)

    # ------------------------------------------------------------------ state, grads, weights

    def init_state(self, batch_size):
        """Zero state: h [D*L, B, H], or (h, c) for LSTM."""
        B = _checks.expect_int("batch_size", batch_size, 1)
        shape = (self.num_directions * self.num_layers, B, self.hidden_size)
        if self.cell == "lstm":
            return self.backend.zeros(shape, self.dtype), self.backend.zeros(shape, self.dtype)
        return self.backend.zeros(shape, self.dtype)

    def zero_grad(self):
        """Set every gradient in ``grads`` to zero (in place)."""
        for g in self.grads.values():
            g[...] = 0

    def _extra_state_names(self):
        """Names state_dict() has beyond params (a tied decoder weight)."""
        return {}

    def state_dict(self):
        """Host numpy copies of the parameters, by name (PyTorch's names)."""
        sd = {name: np.array(self.backend.to_host(p), copy=True) for name, p in self.params.items()}
        for alias, name in self._extra_state_names().items():
            sd[alias] = sd[name].copy()
        return sd

    def load_state_dict(self, state_dict):
        """Copy weights in from a mapping name -> array-like (numpy arrays or torch tensors).

        Names must be exactly those of :meth:`state_dict`; every shape must match. Nothing is
        changed unless every entry is valid.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping name -> array; got {type(state_dict).__name__}")
        aliases = self._extra_state_names()
        expected = set(self.params) | set(aliases)
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"state_dict names do not match this {type(self).__name__}: "
                             f"missing {missing}, unexpected {unexpected}")
        new = {}
        for name in state_dict:
            value = state_dict[name]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            a = np.asarray(value)
            target = self.params[aliases.get(name, name)]
            if a.shape != tuple(target.shape):
                raise ValueError(f"state_dict[{name!r}] must have shape {tuple(target.shape)}; got {a.shape}")
            if a.dtype.kind != "f" or not np.isfinite(a).all():
                raise ValueError(f"state_dict[{name!r}] must be a finite float array; got dtype {a.dtype}")
            new[name] = a
        for alias, name in aliases.items():
            if not np.array_equal(new[alias], new[name]):
                raise ValueError(f"state_dict[{alias!r}] must equal state_dict[{name!r}] (tied weights)")
        for name, p in self.params.items():
            p[...] = self.backend.asarray(new[name], self.dtype)

    def num_parameters(self):
        """Number of scalar parameters (tied weights counted once)."""
        return int(sum(p.size for p in self.params.values()))

    # ------------------------------------------------------------------ dropout and the stack

    def _dropout(self, a, train):
        """Inverted dropout on a [T,B,H] device array -> (dropped, mask or None). With
        ``dropout_rows`` = (B, r0, r1) (data-parallel training: ``a`` holds rows r0..r1-1 of a
        batch of B) the mask is drawn for all B rows, as one process draws it, and rows r0..r1-1
        are kept. With ``replay`` set (:class:`bptt.memory.Replay`) the draws are those the
        replayed forward call made for these steps, and ``rng`` is not touched."""
        if not train or self.dropout == 0:
            return a, None
        draw = self.rng.random if self.replay is None else self.replay.draw
        if self.dropout_rows is None:
            keep = draw(a.shape) >= self.dropout
        else:
            B, r0, r1 = self.dropout_rows
            keep = draw((a.shape[0], B) + tuple(a.shape[2:]))[:, r0:r1] >= self.dropout
        mask = self.backend.asarray(keep / (1.0 - self.dropout), self.dtype)
        return a * mask, mask

    def _split_state(self, state, B):
        """h [D*L,B,H] (or (h, c)) -> list of per-level states h [D,B,H] (or (h, c))."""
        if state is None:
            return [None] * self.num_layers
        D = self.num_directions
        layout = "[2L, B, H]" if self.bidirectional else "[L, B, H]"
        if self.cell == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"state of an LSTM model must be a tuple (h, c) of {layout} arrays; "
                                f"got {type(state).__name__}")
            parts = [_checks.as_float_array(n, s, self.dtype, self.backend) for n, s in zip(("state[0]", "state[1]"), state)]
        else:
            parts = [_checks.as_float_array("state", state, self.dtype, self.backend)]
        for s in parts:
            _checks.expect_shape("state", s, (D * self.num_layers, B, self.hidden_size), layout)
        per_level = [tuple(s[D * k:D * (k + 1)] for s in parts) for k in range(self.num_layers)]
        return per_level if self.cell == "lstm" else [p[0] for p in per_level]

    def _join_state(self, per_level):
        """Inverse of :meth:`_split_state`."""
        xp = self.backend.xp
        if self.cell == "lstm":
            return (xp.concatenate([s[0] for s in per_level]), xp.concatenate([s[1] for s in per_level]))
        return xp.concatenate(per_level)

    def _stack_forward(self, x, state, train, projected=False, lengths=None):
        """x [T,B,I] (projected: x W_ih^T of level 0, [T,B,G*H]; not with bidirectional), state
        h [D*L,B,H] (LSTM (h, c)) or None -> (y [T,B,D*H] of the top level, final state, StackCache).
        Dropout (train) acts on the [T,B,D*H] input of every level above the first.

        lengths: host ints [B] in 1..T, or None: row b runs its steps t < lengths[b] on every
        level (``layer.forward(..., lengths=...)``); the level caches carry them, so
        :meth:`_stack_backward` needs nothing more."""
        states = self._split_state(state, x.shape[1])
        caches, masks, finals = [], [], []
        for k, layer in enumerate(self.layers):
            if k > 0:
                x, mask = self._dropout(x, train)
                masks.append(mask)
            # only a user's x needs the scan for NaN/inf: the levels above take the output of
            # the one below, a projected x comes from the model's weights
            x, final, cache = layer.forward(x, states[k], projected and k == 0,
                                            check_finite=k == 0 and not projected, lengths=lengths)
            caches.append(cache)
            finals.append(final)
        return x, self._join_state(finals), StackCache(caches, masks)

    def _stack_backward(self, dy, cache, dstate, t_start, t_origin=0):
        """dy [T,B,D*H] -> (dx [T,B,I] (projected forward: dL/d(x W_ih^T) [T,B,G*H]),
        d(state entering t_start), dh: list per level of [T,B,D*H]). A bidirectional stack
        needs t_start == 0 (the layers raise ValueError otherwise). t_origin: the stream's step
        of step 0 (the layers' time blocks)."""
        xp = self.backend.xp
        dstates = self._split_state(dstate, dy.shape[1])
        dinit, dh_all = [None] * self.num_layers, [None] * self.num_layers
        for k in reversed(range(self.num_layers)):
            check_finite_grad(xp, dy, f"the output of recurrent level {k}")
            for part in (dstates[k] if isinstance(dstates[k], tuple) else (dstates[k],)):
                if part is not None:
                    check_finite_grad(xp, part, f"the final state of recurrent level {k}")
            dy, dinit[k], (dh_all[k],) = self.layers[k].backward(dy, cache.layers[k], dstates[k], t_start,
                                                                return_dh=True, check_finite=False,
                                                                t_origin=t_origin)
            if k > 0 and cache.masks[k - 1] is not None:
                dy = dy * cache.masks[k - 1]
        return dy, self._join_state(dinit), dh_all

    def _time_blocks(self, t_start, T, t_origin, B):
        """(t0, t1) of the time blocks of steps t_start .. T-1 of a call over B rows whose step 0
        is the stream's step ``t_origin``, the last block first (``bptt_kernels.host.blocks``, the
        one block where the backend's TIME_BLOCKS is False): the output map's and the
        embedding's gradients are summed block by block, as the layers sum theirs."""
        bounds = time_blocks(t_start, T, t_origin, B, self.backend.TIME_BLOCKS).tolist()
        return list(zip(bounds[1:], bounds[:-1]))

    # linear output map: out = h W^T + b over the last axis

    def _linear_forward(self, h, wname, bname):
        W, b = self.params[wname], self.params[bname]
        out = self.backend.linear_forward(h.reshape(-1, h.shape[-1]), W, b)
        return out.reshape(h.shape[:-1] + (W.shape[0],))

    def _linear_backward(self, dout, h, wname, bname):
        """Accumulate dW, db from dout [..., O] and h [..., H]; return dh [..., H]."""
        W = self.params[wname]
        dh = self.backend.linear_backward(dout.reshape(-1, W.shape[0]), h.reshape(-1, W.shape[1]),
                                          W, self.grads[wname], self.grads[bname])
        return dh.reshape(h.shape)

    def _steps_linear_backward(self, dout, h, dh, wname, bname, blocks):
        """``_linear_backward`` of the steps of ``blocks`` (``_time_blocks``; dout [T,B,O],
        h [T,B,H]) into those rows of dh [T,B,H], one time block after the other."""
        for t0, t1 in blocks:
            dh[t0:t1] = self._linear_backward(dout[t0:t1], h[t0:t1], wname, bname)
