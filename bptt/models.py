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

The recurrent stack (:mod:`bptt.recurrent_stack`) is kept as one single-layer layer per level
(``model.layers``), so dropout can sit between levels; parameters are exposed as
``rnn.weight_ih_l{k}`` etc. and the state is one h [L, B, H] (LSTM: (h, c)) as for a stacked
torch.nn layer.

A forward's cache converts to a plain dict of host arrays (``cache.to_dict(to_host)``, the
backends' caches by field name) and back on any backend (``model.cache_from_dict(d)``), so a
checkpoint taken inside a TBPTT window resumes on another backend.
"""

import inspect
import math

import numpy as np

from bptt import _checks
from bptt.layers import device_copy
from bptt_kernels.host import as_lengths
from bptt.recurrent_stack import (NonFiniteGradientError, RecurrentModelBase, StackCache, check_finite_grad,
                                  host_or_none, json_seed, make_layer)

__all__ = ["LanguageModel", "SequenceModel", "LMCache", "SeqCache", "StackCache", "NonFiniteGradientError",
           "make_layer", "MODELS", "model_from_config", "model_to_dict", "model_from_dict", "check_model_dict",
           "load_model_dict"]


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

    def to_dict(self, to_host):
        """Plain dict of host arrays (through ``to_host``), None and the stack's dict;
        :meth:`LanguageModel.cache_from_dict` is the inverse (on any backend)."""
        return {"ids": to_host(self.ids), "emb_mask": host_or_none(to_host, self.emb_mask),
                "stack": self.stack.to_dict(to_host), "out_mask": host_or_none(to_host, self.out_mask),
                "h": to_host(self.h)}


# Level 0's input projection E[ids] W_ih^T is the gather (E W_ih^T)[ids] from a [V, G*H] table.
# Where no dropout sits between the embedding and level 0 and a chunk has at least this many
# token rows (T*B) per vocabulary entry, the model makes that table (V*E*G*H multiply-adds)
# instead of projecting every row (T*B*E*G*H), and backward scatter-adds dL/d(x W_ih^T) into a
# [V, G*H] table gradient instead of the dx and dW_ih GEMMs over all rows (the char-LM's
# figures: docs/performance.md). The table's GEMMs run through the backend's linear ops, like
# every GEMM of a training step. Sampling (T*B = 1) keeps the plain path.
EMBEDDING_FOLD_ROWS_PER_WORD = 4


class LanguageModel(RecurrentModelBase):
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
                       "dtype": self.dtype.name, "seed": json_seed(seed)}

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
            w_ih = self.params["rnn.weight_ih_l0"]                                     # G*H,E
            no_bias = self.backend.zeros((w_ih.shape[0],), self.dtype)
            table = self.backend.linear_forward(E, w_ih, no_bias)                     # V,G*H
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
        projection (see EMBEDDING_FOLD_ROWS_PER_WORD); a replayed part of a forward call
        (``replay``) decides as that whole call did."""
        if self.replay is not None:
            rows = self.replay.rows
        no_dropout = not train or self.dropout == 0
        return no_dropout and rows >= EMBEDDING_FOLD_ROWS_PER_WORD * self.vocab_size

    def backward(self, dout, cache, dstate=None, t_start=0, return_dh=False, t_origin=0):
        """Backpropagate through steps t_start..T-1 of a forward call; accumulates ``grads``.

        dout    [T,B,V] dL/dlogits, or None for zero (a chunk whose outputs carry no loss)
        dstate  dL/d(final state), like the state (None: zeros)
        t_origin  the stream's step of step 0: every gradient sum over time runs in the fixed
                time blocks of ``bptt_kernels.host.blocks`` (calls that meet at block
                boundaries give the gradients of one call bit for bit on reference and cpu)
        Returns dL/d(state entering step t_start); with return_dh also the list (per level,
        bottom first) of [T,B,H] total dL/dh_t.
        """
        if cache is None:
            raise ValueError("backward needs the cache of a forward(..., train=True) call")
        xp = self.backend.xp
        T, B, H = cache.h.shape
        t_start = _checks.expect_int("t_start", t_start, 0, T - 1)
        t_origin = _checks.expect_int("t_origin", t_origin, 0)
        dh_top = xp.zeros((T, B, H), self.dtype)
        blocks = self._time_blocks(t_start, T, t_origin, B)
        if dout is not None:
            if tuple(dout.shape) != (T, B, self.vocab_size):
                raise ValueError(f"dout must have shape [T, B, V] = {(T, B, self.vocab_size)}; got {tuple(dout.shape)}")
            self._steps_linear_backward(dout, cache.h, dh_top, self._decoder_weight_name(), "decoder.bias",
                                        blocks)
            if cache.out_mask is not None:
                dh_top *= cache.out_mask
        demb, dstate, dh = self._stack_backward(dh_top, cache.stack, dstate, t_start, t_origin)
        check_finite_grad(xp, demb, "the embeddings")
        if cache.stack.layers[0].projected:                # demb: dL/d(E W_ih^T)[ids], T,B,G*H
            w_ih, E = self.params["rnn.weight_ih_l0"], self.params["encoder.weight"]
            no_bias = xp.zeros((w_ih.shape[0],), self.dtype)                          # G*H
            for t0, t1 in blocks:
                dtable = xp.zeros((self.vocab_size, w_ih.shape[0]), self.dtype)       # V,G*H
                self.backend.embedding_backward(dtable, cache.ids[t0:t1], demb[t0:t1])
                self.grads["encoder.weight"] += self.backend.linear_backward(         # V,E
                    dtable, E, w_ih, self.grads["rnn.weight_ih_l0"], no_bias)  # dW_ih += dtable^T E
            return (dstate, dh) if return_dh else dstate
        if cache.emb_mask is not None:
            demb = demb * cache.emb_mask
        for t0, t1 in blocks:
            self.backend.embedding_backward(self.grads["encoder.weight"], cache.ids[t0:t1], demb[t0:t1])
        return (dstate, dh) if return_dh else dstate

    def cache_from_dict(self, d):
        """The :class:`LMCache` of ``LMCache.to_dict``'s dict ``d`` (saved on any backend), on this
        model's backend, its layer caches owned by this model's layers."""
        return LMCache(device_copy(self.backend, d["ids"]), self._device_or_none(d["emb_mask"]),
                       self._stack_cache_from_dict(d["stack"]), self._device_or_none(d["out_mask"]),
                       device_copy(self.backend, d["h"]))

    def __repr__(self):
        c = self.config
        return (f"LanguageModel(V={c['vocab_size']}, E={c['embedding_size']}, H={c['hidden_size']}, "
                f"L={c['num_layers']}, cell={c['cell']!r}, dropout={c['dropout']}, tie_weights={c['tie_weights']}, "
                f"dtype={c['dtype']}, backend={self.backend.NAME!r})")


class SeqCache:
    """Saved by :meth:`SequenceModel.forward`: the stack cache, y [T,B,D*H] (the readout's input)
    and the rows' lengths (host int64 [B], or None: every row all T steps)."""

    __slots__ = ("stack", "y", "lengths")

    def __init__(self, stack, y, lengths=None):
        self.stack, self.y, self.lengths = stack, y, lengths

    def to_dict(self, to_host):
        """{"stack": the stack's dict, "y": host array, "lengths": host array or None};
        :meth:`SequenceModel.cache_from_dict` is the inverse (on any backend)."""
        return {"stack": self.stack.to_dict(to_host), "y": to_host(self.y),
                "lengths": None if self.lengths is None else np.array(self.lengths, copy=True)}


class SequenceModel(RecurrentModelBase):
    """Recurrent stack -> linear readout, on float inputs [T,B,I].

    readout "every_step": outputs [T,B,O] (one per step); "last_step": outputs [B,O] from each
    row's last step (step lengths[b]-1 of row b, T-1 without lengths). bidirectional: every level
    has a reverse direction (PyTorch's layout: y [T,B,2H], forward half then reverse half, state
    [2L,B,H]); its last-step readout reads the two directions' final states concatenated as
    torch's h_n[-2:] (the forward half at the row's last step, the reverse half at step 0).
    Parameters: rnn.* as LanguageModel (bidirectional: also rnn.*_reverse), readout.weight
    [O,D*H], readout.bias [O] (initialised as torch.nn.Linear: uniform(-1/sqrt(D*H), 1/sqrt(D*H))),
    D = 2 directions if bidirectional, else 1.
    """

    READOUTS = ("every_step", "last_step")

    def __init__(self, input_size, hidden_size, output_size, num_layers=1, cell="lstm", readout="every_step",
                 dtype=np.float32, seed=None, bidirectional=False):
        self.input_size = _checks.expect_int("input_size", input_size, 1)
        self.output_size = _checks.expect_int("output_size", output_size, 1)
        if readout not in self.READOUTS:
            raise ValueError(f"readout must be one of {self.READOUTS}; got {readout!r}")
        self.readout = readout
        rng = self._init_stack(cell, input_size, hidden_size, num_layers, 0.0, dtype, seed, bidirectional)
        features = self.num_directions * self.hidden_size                      # D*H
        bound = 1.0 / math.sqrt(features)
        self._add_param("readout.weight", rng.uniform(-bound, bound, (self.output_size, features)))
        self._add_param("readout.bias", rng.uniform(-bound, bound, (self.output_size,)))
        self.config = {"input_size": self.input_size, "hidden_size": self.hidden_size,
                       "output_size": self.output_size, "num_layers": self.num_layers, "cell": self.cell,
                       "readout": readout, "bidirectional": self.bidirectional, "dtype": self.dtype.name,
                       "seed": json_seed(seed)}

    def forward(self, inputs, state=None, train=True, lengths=None):
        """inputs float [T,B,I]; state h [D*L,B,H] (LSTM (h, c)) or None (zeros); lengths: host
        ints [B] in 1..T, or None: row b runs only its steps t < lengths[b] (y is 0 past them:
        every-step outputs there are the readout of 0 and should carry no loss).

        Returns outputs ([T,B,O], or [B,O] for "last_step"), the final state (each row's after
        its own last step) and a :class:`SeqCache` (None when train=False).
        """
        x = _checks.as_float_array("inputs", inputs, self.dtype, self.backend)
        _checks.expect_ndim("inputs", x, 3, "[T, B, I]")
        y, state, stack = self._stack_forward(x, state, train, lengths=lengths)   # T,B,D*H; checks lengths
        lengths = as_lengths("lengths", lengths, *x.shape[:2])                    # host int64 [B] or None
        h = y if self.readout == "every_step" else self._final_features(y, lengths)
        out = self._linear_forward(h, "readout.weight", "readout.bias")
        return out, state, (SeqCache(stack, y, lengths) if train else None)

    def _last_steps(self, lengths, T, B):
        """Index pair (steps, rows) of each row's last step in a [T,B,...] array: (T-1, all rows)
        without lengths, else device ints (lengths - 1, 0..B-1)."""
        if lengths is None:
            return T - 1, slice(None)
        xp = self.backend.xp
        return self.backend.asarray(lengths - 1, np.int64), xp.arange(B)

    def _final_features(self, y, lengths):
        """The last-step readout's input [B,D*H] from y [T,B,D*H]: the forward half at each row's
        last step, the reverse half (bidirectional) at step 0, where that direction ends."""
        T, B, H = y.shape[0], y.shape[1], self.hidden_size
        h = y[self._last_steps(lengths, T, B)]                                    # B,D*H
        if self.bidirectional:
            h = self.backend.xp.concatenate([h[:, :H], y[0, :, H:]], axis=1)
        return h

    def backward(self, dout, cache, dstate=None, t_start=0, return_dh=False, t_origin=0):
        """As :meth:`LanguageModel.backward`; dout [T,B,O] or [B,O] (last_step), or None. The
        last-step gradient reaches the positions the forward read (``_final_features``)."""
        if cache is None:
            raise ValueError("backward needs the cache of a forward(..., train=True) call")
        y = cache.y
        t_start = _checks.expect_int("t_start", t_start, 0, y.shape[0] - 1)
        t_origin = _checks.expect_int("t_origin", t_origin, 0)
        dy = self.backend.xp.zeros(y.shape, self.dtype)
        if dout is not None:
            expected = (y.shape[:2] if self.readout == "every_step" else y.shape[1:2]) + (self.output_size,)
            if tuple(dout.shape) != expected:
                raise ValueError(f"dout must have the outputs' shape {expected}; got {tuple(dout.shape)}")
            if self.readout == "every_step":
                self._steps_linear_backward(dout, y, dy, "readout.weight", "readout.bias",
                                            self._time_blocks(t_start, y.shape[0], t_origin, y.shape[1]))
            else:
                H = self.hidden_size
                dh = self._linear_backward(dout, self._final_features(y, cache.lengths),     # B,D*H
                                           "readout.weight", "readout.bias")
                steps, rows = self._last_steps(cache.lengths, *y.shape[:2])
                dy[steps, rows, :H] = dh[:, :H]                  # forward half: each row's last step
                if self.bidirectional:
                    dy[0, :, H:] = dh[:, H:]                     # reverse half: step 0
        _, dstate, dh = self._stack_backward(dy, cache.stack, dstate, t_start, t_origin)
        return (dstate, dh) if return_dh else dstate

    def cache_from_dict(self, d):
        """The :class:`SeqCache` of ``SeqCache.to_dict``'s dict ``d`` (saved on any backend), on
        this model's backend, its layer caches owned by this model's layers."""
        lengths = d.get("lengths")        # absent from the dicts of caches saved before lengths
        return SeqCache(self._stack_cache_from_dict(d["stack"]), device_copy(self.backend, d["y"]),
                        None if lengths is None else np.array(lengths, np.int64))

    def __repr__(self):
        c = self.config
        return (f"SequenceModel(I={c['input_size']}, H={c['hidden_size']}, O={c['output_size']}, "
                f"L={c['num_layers']}, cell={c['cell']!r}, readout={c['readout']!r}, "
                f"{'bidirectional=True, ' if c['bidirectional'] else ''}dtype={c['dtype']}, "
                f"backend={self.backend.NAME!r})")


MODELS = {"LanguageModel": LanguageModel, "SequenceModel": SequenceModel}


def model_from_config(type_name, config):
    """Build ``MODELS[type_name](**config)`` (the inverse of ``type(model).__name__, model.config``)."""
    cls = MODELS.get(type_name)
    if cls is None:
        raise ValueError(f"unknown model type {type_name!r}; known: {', '.join(MODELS)}")
    return cls(**config)


def model_to_dict(model):
    """{"type", "config", "rng_state" (dropout), "weights": model.state_dict()} (host copies)."""
    return {"type": type(model).__name__, "config": dict(model.config),
            "rng_state": model.rng.bit_generator.state, "weights": model.state_dict()}


def check_model_dict(model, d):
    """ValueError unless ``model`` has the type and config (its seed aside) of ``model_to_dict``'s ``d``."""
    if d["type"] != type(model).__name__:
        raise ValueError(f"the state is of a {d['type']}, not a {type(model).__name__}")
    ours = {k: v for k, v in model.config.items() if k != "seed"}
    # a key the dict lacks (saved before the key existed) counts as its constructor default
    defaults = {name: p.default for name, p in inspect.signature(type(model)).parameters.items()
                if name in ours and name not in d["config"] and p.default is not p.empty}
    theirs = {k: v for k, v in {**defaults, **d["config"]}.items() if k != "seed"}
    if ours != theirs:
        raise ValueError(f"the state is of a {d['type']} with config {theirs}; this one has {ours}")


def load_model_dict(model, d):
    """Load ``model_to_dict``'s weights and dropout RNG state into ``model`` (checked by
    :func:`check_model_dict` first)."""
    check_model_dict(model, d)
    model.load_state_dict(d["weights"])
    model.rng.bit_generator.state = d["rng_state"]


def model_from_dict(d):
    """The model of ``model_to_dict``'s dict ``d``, built on the current backend."""
    model = model_from_config(d["type"], d["config"])
    load_model_dict(model, d)
    return model
