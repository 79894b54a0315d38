"""Models: a word/char language model and a sequence model, built on the recurrent layers.

Both are a stack of recurrent layers between an input map and a linear output map, with an
explicit forward (returning a cache) and backward (accumulating ``+=`` into ``model.grads``),
like the layers. Shapes are time-major: T steps, B batch (streams), V vocabulary, E embedding
size, H hidden size, L layers, I input size, O output size.

:class:`LanguageModel` is PyTorch's word_language_model ``RNNModel``: Embedding -> dropout ->
stacked LSTM/GRU/RNN (dropout between layers, as ``torch.nn.LSTM(dropout=p)``) -> dropout ->
Linear decoder, with the same initialisation (encoder and decoder weights uniform(-0.1, 0.1),
decoder bias 0, recurrent weights as torch.nn) and the same ``state_dict`` names, so a
checkpoint of that example loads as is (``model.load_state_dict(torch_model.state_dict())``).

Dropout is inverted dropout (kept units scaled by 1/(1-p), as torch.nn.Dropout); its masks are
drawn from the model's own ``numpy.random.Generator`` (``model.rng``, seeded from ``seed`` and
saved in checkpoints) and kept in the cache for backward. ``forward(..., train=False)``
applies no dropout.

The recurrent stack is kept as one single-layer layer per level (``model.layers``), so dropout
can sit between levels; parameters are exposed as ``rnn.weight_ih_l{k}`` etc. and the state is
one h [L, B, H] (LSTM: (h, c)) as for a stacked torch.nn layer.
"""

import math

import numpy as np

from bptt import _checks
from bptt.backend import get_backend
from bptt.layers import GRU, LSTM, RNN
from bptt_kernels import CELLS


class NonFiniteGradientError(FloatingPointError):
    """A gradient flowing back through a model became NaN or inf."""


def make_layer(cell, input_size, hidden_size, dtype, seed):
    """One single-level recurrent layer of ``cell`` ("lstm", "gru", "rnn_tanh", "rnn_relu")."""
    if cell == "lstm":
        return LSTM(input_size, hidden_size, 1, dtype=dtype, seed=seed)
    if cell == "gru":
        return GRU(input_size, hidden_size, 1, dtype=dtype, seed=seed)
    if cell in ("rnn_tanh", "rnn_relu"):
        return RNN(input_size, hidden_size, 1, nonlinearity=cell[4:], dtype=dtype, seed=seed)
    raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")


def _check_dropout(dropout):
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
    return float(dropout)


def _json_seed(seed):
    """The seed as recorded in ``config``: an int, or None when not an int (a Generator...)."""
    return int(seed) if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else None


def _check_finite_grad(xp, a, where):
    if not bool(xp.isfinite(a).all()):
        raise NonFiniteGradientError(f"the gradient at {where} contains NaN or inf")


class StackCache:
    """Saved by the recurrent stack's forward: one layer cache per level and the dropout masks
    applied to the input of levels 1..L-1 (None where no dropout was applied)."""

    __slots__ = ("layers", "masks")

    def __init__(self, layers, masks):
        self.layers, self.masks = layers, masks


class _RecurrentModel:
    """Shared parts: the recurrent stack, dropout, parameter bookkeeping, state_dict."""

    def _init_stack(self, cell, input_size, hidden_size, num_layers, dropout, dtype, seed):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
        self.cell = cell
        self.hidden_size = _checks.expect_int("hidden_size", hidden_size, 1)
        self.num_layers = _checks.expect_int("num_layers", num_layers, 1)
        self.dropout = _check_dropout(dropout)
        self.dtype = np.dtype(dtype)
        self.backend = get_backend()
        if self.dtype not in self.backend.DTYPES:
            raise TypeError(f"dtype {self.dtype.name} is not supported by backend {self.backend.NAME!r}")
        seeds = np.random.SeedSequence(seed)
        init_seed, dropout_seed, *layer_seeds = seeds.spawn(2 + self.num_layers)
        self.rng = np.random.default_rng(dropout_seed)        # dropout masks
        self.layers = [make_layer(cell, input_size if k == 0 else self.hidden_size, self.hidden_size,
                                  self.dtype, layer_seeds[k])
                       for k in range(self.num_layers)]
        self.params, self.grads = {}, {}
        for k, layer in enumerate(self.layers):
            for name in layer.params:                          # weight_ih_l0 ... of level k
                public = "rnn." + name[:-1] + str(k)
                self.params[public] = layer.params[name]
                self.grads[public] = layer.grads[name]
        return np.random.default_rng(init_seed)

    def _add_param(self, name, host_value):
        self.params[name] = self.backend.asarray(host_value, self.dtype)
        self.grads[name] = self.backend.zeros(self.params[name].shape, self.dtype)

    # ------------------------------------------------------------------ state, grads, weights

    def init_state(self, batch_size):
        """Zero state: h [L, B, H], or (h, c) for LSTM."""
        B = _checks.expect_int("batch_size", batch_size, 1)
        shape = (self.num_layers, B, self.hidden_size)
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
        """Inverted dropout on a [.., H] device array -> (dropped, mask or None)."""
        if not train or self.dropout == 0:
            return a, None
        keep = self.rng.random(a.shape) >= self.dropout
        mask = self.backend.asarray(keep / (1.0 - self.dropout), self.dtype)
        return a * mask, mask

    def _split_state(self, state, B):
        """h [L,B,H] (or (h, c)) -> list of per-level states h [1,B,H] (or (h, c))."""
        if state is None:
            return [None] * self.num_layers
        if self.cell == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"state of an LSTM model must be a tuple (h, c) of [L, B, H] arrays; "
                                f"got {type(state).__name__}")
            parts = [_checks.as_float_array(n, s, self.dtype, self.backend) for n, s in zip(("state[0]", "state[1]"), state)]
        else:
            parts = [_checks.as_float_array("state", state, self.dtype, self.backend)]
        for s in parts:
            _checks.expect_shape("state", s, (self.num_layers, B, self.hidden_size), "[L, B, H]")
        per_level = [tuple(s[k:k + 1] for s in parts) for k in range(self.num_layers)]
        return per_level if self.cell == "lstm" else [p[0] for p in per_level]

    def _join_state(self, per_level):
        """Inverse of :meth:`_split_state`."""
        xp = self.backend.xp
        if self.cell == "lstm":
            return (xp.concatenate([s[0] for s in per_level]), xp.concatenate([s[1] for s in per_level]))
        return xp.concatenate(per_level)

    def _stack_forward(self, x, state, train, projected=False):
        """x [T,B,I] (projected: x W_ih^T of level 0, [T,B,G*H])
        -> (y [T,B,H] of the top level, final state, StackCache)."""
        states = self._split_state(state, x.shape[1])
        caches, masks, finals = [], [], []
        for k, layer in enumerate(self.layers):
            if k > 0:
                x, mask = self._dropout(x, train)
                masks.append(mask)
            # only a user's x needs the scan for NaN/inf: the levels above take the output of
            # the one below, a projected x comes from the model's weights
            x, final, cache = layer._forward(x, states[k], projected and k == 0,
                                             check_finite=k == 0 and not projected)
            caches.append(cache)
            finals.append(final)
        return x, self._join_state(finals), StackCache(caches, masks)

    def _stack_backward(self, dy, cache, dstate, t_start):
        """dy [T,B,H] -> (dx [T,B,I] (projected forward: dL/d(x W_ih^T) [T,B,G*H]),
        d(state entering t_start), dh: list per level of [T,B,H])."""
        xp = self.backend.xp
        dstates = self._split_state(dstate, dy.shape[1])
        dinit, dh_all = [None] * self.num_layers, [None] * self.num_layers
        for k in reversed(range(self.num_layers)):
            _check_finite_grad(xp, dy, f"the output of recurrent level {k}")
            for part in (dstates[k] if isinstance(dstates[k], tuple) else (dstates[k],)):
                if part is not None:
                    _check_finite_grad(xp, part, f"the final state of recurrent level {k}")
            dy, dinit[k], (dh_all[k],) = self.layers[k]._backward(dy, cache.layers[k], dstates[k], t_start,
                                                                 return_dh=True, check_finite=False)
            if k > 0 and cache.masks[k - 1] is not None:
                dy = dy * cache.masks[k - 1]
        return dy, self._join_state(dinit), dh_all

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


class LMCache:
    """Saved by :meth:`LanguageModel.forward` for backward.

    ids        [T,B] int64 device array
    emb_mask   [T,B,E] dropout mask on the embeddings (None: no dropout)
    stack      StackCache of the recurrent levels
    out_mask   [T,B,H] dropout mask on the recurrent output (None: no dropout)
    h          [T,B,H] decoder input (recurrent output after dropout)
    """

    __slots__ = ("ids", "emb_mask", "stack", "out_mask", "h")

    def __init__(self, ids, emb_mask, stack, out_mask, h):
        self.ids, self.emb_mask, self.stack, self.out_mask, self.h = ids, emb_mask, stack, out_mask, h


# Level 0's input projection E[ids] W_ih^T is the gather (E W_ih^T)[ids] from a [V, G*H] table.
# Where no dropout sits between the embedding and level 0 and a chunk has at least this many
# token rows (T*B) per vocabulary entry, the model makes that table (V*E*G*H multiply-adds)
# instead of projecting every row (T*B*E*G*H), and backward scatter-adds dL/d(x W_ih^T) into a
# [V, G*H] table gradient instead of the dx and dW_ih GEMMs over all rows. Char-LM of
# perf/profile.py (V=104, E=128, 2-layer LSTM 256, B=32, k1=50): 3 of the 12 large GEMMs of
# an update go; level 0's forward 8.5 -> 6.3 ms, backward 15.8 -> 11.8, for 1.1 ms of table
# work. Sampling (T*B = 1) keeps the plain path.
EMBEDDING_FOLD_ROWS_PER_WORD = 4


class LanguageModel(_RecurrentModel):
    """Embedding -> dropout -> recurrent stack -> dropout -> linear decoder (PyTorch's RNNModel).

    vocab_size V, embedding_size E, hidden_size H, num_layers L; cell "lstm" | "gru" |
    "rnn_tanh" | "rnn_relu"; dropout p in [0, 1); tie_weights: the decoder uses the encoder's
    weight (needs E == H; one parameter ``encoder.weight``, ``state_dict`` also lists it as
    ``decoder.weight``). Parameters: encoder.weight [V,E], rnn.weight_ih_l{k}, rnn.weight_hh_l{k},
    rnn.bias_ih_l{k}, rnn.bias_hh_l{k}, decoder.weight [V,H], decoder.bias [V].
    Long chunks over a small vocabulary fold the embedding into level 0's input projection
    (``EMBEDDING_FOLD_ROWS_PER_WORD``); the results are the same up to float rounding.
    """

    def __init__(self, vocab_size, embedding_size, hidden_size, num_layers=1, cell="lstm", dropout=0.0,
                 tie_weights=False, dtype=np.float32, seed=None):
        self.vocab_size = _checks.expect_int("vocab_size", vocab_size, 1)
        self.embedding_size = _checks.expect_int("embedding_size", embedding_size, 1)
        self.tie_weights = bool(tie_weights)
        if self.tie_weights and embedding_size != hidden_size:
            raise ValueError(f"tie_weights=True needs embedding_size == hidden_size; "
                             f"got {embedding_size} and {hidden_size}")
        rng = self._init_stack(cell, embedding_size, hidden_size, num_layers, dropout, dtype, seed)
        V, E, H = self.vocab_size, self.embedding_size, self.hidden_size
        self._add_param("encoder.weight", rng.uniform(-0.1, 0.1, (V, E)))
        decoder_weight = rng.uniform(-0.1, 0.1, (V, H))
        if self.tie_weights:
            self.params["encoder.weight"][...] = self.backend.asarray(decoder_weight, self.dtype)
        else:
            self._add_param("decoder.weight", decoder_weight)
        self._add_param("decoder.bias", np.zeros(V))
        self.config = {"vocab_size": V, "embedding_size": E, "hidden_size": H, "num_layers": self.num_layers,
                       "cell": self.cell, "dropout": self.dropout, "tie_weights": self.tie_weights,
                       "dtype": self.dtype.name, "seed": _json_seed(seed)}

    def _decoder_weight_name(self):
        return "encoder.weight" if self.tie_weights else "decoder.weight"

    def _extra_state_names(self):
        return {"decoder.weight": "encoder.weight"} if self.tie_weights else {}

    def _ids(self, inputs):
        if not isinstance(inputs, self.backend.xp.ndarray):
            inputs = np.asarray(inputs)                 # host ids (device ids are used as they are)
        if inputs.ndim != 2 or inputs.dtype.kind not in "iu":
            raise ValueError(f"inputs must be int token ids [T, B]; got {inputs.ndim}-D array of dtype {inputs.dtype}")
        if inputs.shape[0] < 1 or inputs.shape[1] < 1:
            raise ValueError(f"inputs must have at least one step and one stream; got shape {tuple(inputs.shape)}")
        if isinstance(inputs, np.ndarray) and (inputs.min() < 0 or inputs.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got range "
                             f"[{int(inputs.min())}, {int(inputs.max())}]")
        return self.backend.asarray(inputs, np.int64)

    def forward(self, inputs, state=None, train=True):
        """inputs int [T,B] token ids; state h [L,B,H] (LSTM (h, c)) or None (zeros).

        Returns logits [T,B,V], final state, and an :class:`LMCache` (None when train=False).
        """
        ids = self._ids(inputs)
        E = self.params["encoder.weight"]                                             # V,E
        if self._folds_embedding(ids.size, train):
            table = self.backend.xp.matmul(E, self.params["rnn.weight_ih_l0"].T)      # V,G*H
            xw = self.backend.embedding_forward(table, ids)                           # T,B,G*H
            y, state, stack = self._stack_forward(xw, state, train, projected=True)   # T,B,H
            emb_mask = None
        else:
            emb = self.backend.embedding_forward(E, ids)                              # T,B,E
            emb, emb_mask = self._dropout(emb, train)
            y, state, stack = self._stack_forward(emb, state, train)                  # T,B,H
        h, out_mask = self._dropout(y, train)
        logits = self._linear_forward(h, self._decoder_weight_name(), "decoder.bias")  # T,B,V
        cache = LMCache(ids, emb_mask, stack, out_mask, h) if train else None
        return logits, state, cache

    def _folds_embedding(self, rows, train):
        """Whether a forward over ``rows`` = T*B tokens folds the embedding into level 0's input
        projection (see EMBEDDING_FOLD_ROWS_PER_WORD)."""
        no_dropout = not train or self.dropout == 0
        return no_dropout and rows >= EMBEDDING_FOLD_ROWS_PER_WORD * self.vocab_size

    def backward(self, dout, cache, dstate=None, t_start=0, return_dh=False):
        """Backpropagate through steps t_start..T-1 of a forward call; accumulates ``grads``.

        dout    [T,B,V] dL/dlogits, or None for zero (a chunk whose outputs carry no loss)
        dstate  dL/d(final state), like the state (None: zeros)
        Returns dL/d(state entering step t_start); with return_dh also the list (per level,
        bottom first) of [T,B,H] total dL/dh_t.
        """
        if cache is None:
            raise ValueError("backward needs the cache of a forward(..., train=True) call")
        xp = self.backend.xp
        T, B, H = cache.h.shape
        dh_top = xp.zeros((T, B, H), self.dtype)
        if dout is not None:
            if tuple(dout.shape) != (T, B, self.vocab_size):
                raise ValueError(f"dout must have shape [T, B, V] = {(T, B, self.vocab_size)}; got {tuple(dout.shape)}")
            dh_top[t_start:] = self._linear_backward(dout[t_start:], cache.h[t_start:],
                                                     self._decoder_weight_name(), "decoder.bias")
            if cache.out_mask is not None:
                dh_top *= cache.out_mask
        demb, dstate, dh = self._stack_backward(dh_top, cache.stack, dstate, t_start)
        _check_finite_grad(xp, demb, "the embeddings")
        if cache.stack.layers[0].projected:                # demb: dL/d(E W_ih^T)[ids], T,B,G*H
            w_ih, E = self.params["rnn.weight_ih_l0"], self.params["encoder.weight"]
            dtable = xp.zeros((self.vocab_size, w_ih.shape[0]), self.dtype)           # V,G*H
            self.backend.embedding_backward(dtable, cache.ids[t_start:], demb[t_start:])
            self.grads["rnn.weight_ih_l0"] += xp.matmul(dtable.T, E)                  # G*H,E
            self.grads["encoder.weight"] += xp.matmul(dtable, w_ih)                   # V,E
            return (dstate, dh) if return_dh else dstate
        if cache.emb_mask is not None:
            demb = demb * cache.emb_mask
        self.backend.embedding_backward(self.grads["encoder.weight"], cache.ids[t_start:], demb[t_start:])
        return (dstate, dh) if return_dh else dstate

    def __repr__(self):
        c = self.config
        return (f"LanguageModel(V={c['vocab_size']}, E={c['embedding_size']}, H={c['hidden_size']}, "
                f"L={c['num_layers']}, cell={c['cell']!r}, dropout={c['dropout']}, tie_weights={c['tie_weights']}, "
                f"dtype={c['dtype']}, backend={self.backend.NAME!r})")


class SeqCache:
    """Saved by :meth:`SequenceModel.forward`: x [T,B,I], stack cache, y [T,B,H] (readout input)."""

    __slots__ = ("stack", "y")

    def __init__(self, stack, y):
        self.stack, self.y = stack, y


class SequenceModel(_RecurrentModel):
    """Recurrent stack -> linear readout, on float inputs [T,B,I].

    readout "every_step": outputs [T,B,O] (one per step); "last_step": outputs [B,O] from the
    last step only. Parameters: rnn.* as LanguageModel, readout.weight [O,H], readout.bias [O]
    (initialised as torch.nn.Linear: uniform(-1/sqrt(H), 1/sqrt(H))).
    """

    READOUTS = ("every_step", "last_step")

    def __init__(self, input_size, hidden_size, output_size, num_layers=1, cell="lstm", readout="every_step",
                 dtype=np.float32, seed=None):
        self.input_size = _checks.expect_int("input_size", input_size, 1)
        self.output_size = _checks.expect_int("output_size", output_size, 1)
        if readout not in self.READOUTS:
            raise ValueError(f"readout must be one of {self.READOUTS}; got {readout!r}")
        self.readout = readout
        rng = self._init_stack(cell, input_size, hidden_size, num_layers, 0.0, dtype, seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        self._add_param("readout.weight", rng.uniform(-bound, bound, (self.output_size, self.hidden_size)))
        self._add_param("readout.bias", rng.uniform(-bound, bound, (self.output_size,)))
        self.config = {"input_size": self.input_size, "hidden_size": self.hidden_size,
                       "output_size": self.output_size, "num_layers": self.num_layers, "cell": self.cell,
                       "readout": readout, "dtype": self.dtype.name, "seed": _json_seed(seed)}

    def forward(self, inputs, state=None, train=True):
        """inputs float [T,B,I]; returns outputs ([T,B,O] or [B,O]), final state, cache."""
        x = _checks.as_float_array("inputs", inputs, self.dtype, self.backend)
        _checks.expect_ndim("inputs", x, 3, "[T, B, I]")
        y, state, stack = self._stack_forward(x, state, train)                  # T,B,H
        h = y if self.readout == "every_step" else y[-1]
        out = self._linear_forward(h, "readout.weight", "readout.bias")
        return out, state, (SeqCache(stack, y) if train else None)

    def backward(self, dout, cache, dstate=None, t_start=0, return_dh=False):
        """As :meth:`LanguageModel.backward`; dout [T,B,O] or [B,O] (last_step), or None."""
        if cache is None:
            raise ValueError("backward needs the cache of a forward(..., train=True) call")
        y = cache.y
        dy = self.backend.xp.zeros(y.shape, self.dtype)
        if dout is not None:
            expected = (y.shape[:2] if self.readout == "every_step" else y.shape[1:2]) + (self.output_size,)
            if tuple(dout.shape) != expected:
                raise ValueError(f"dout must have the outputs' shape {expected}; got {tuple(dout.shape)}")
            if self.readout == "every_step":
                dy[t_start:] = self._linear_backward(dout[t_start:], y[t_start:], "readout.weight", "readout.bias")
            else:
                dy[-1] = self._linear_backward(dout, y[-1], "readout.weight", "readout.bias")
        _, dstate, dh = self._stack_backward(dy, cache.stack, dstate, t_start)
        return (dstate, dh) if return_dh else dstate

    def __repr__(self):
        c = self.config
        return (f"SequenceModel(I={c['input_size']}, H={c['hidden_size']}, O={c['output_size']}, "
                f"L={c['num_layers']}, cell={c['cell']!r}, readout={c['readout']!r}, dtype={c['dtype']}, "
                f"backend={self.backend.NAME!r})")


MODELS = {"LanguageModel": LanguageModel, "SequenceModel": SequenceModel}


def model_from_config(type_name, config):
    """Build ``MODELS[type_name](**config)`` (the inverse of ``type(model).__name__, model.config``)."""
    cls = MODELS.get(type_name)
    if cls is None:
        raise ValueError(f"unknown model type {type_name!r}; known: {', '.join(MODELS)}")
    return cls(**config)
