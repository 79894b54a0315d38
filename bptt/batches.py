"""The data as the trainer walks it: groups of B parallel streams that the recurrent state runs
through from zero (:class:`Dataset`, :class:`Group`), and where an epoch stands between two
updates (:class:`Position`, with the TBPTT ring buffer of :class:`Segment` caches).

Shapes: T steps of a group, B streams (batch), I input size, O output size, L levels, H hidden.
"""

import copy
import zlib

import numpy as np

from bptt import losses
from bptt.data import DataError
from bptt.layers import device_copy, host_copy
from bptt.models import LanguageModel, SequenceModel
from bptt_kernels.host import as_lengths


# ------------------------------------------------------------------------------------------
# Data: groups of steps that the state runs through from zero


def stream_views(tokens, batch_size):
    """1-D tokens [len] -> a view [len // B, B] whose column b is stream b, tokens[b n:(b + 1) n]
    (n = len // B): :func:`batchify` without the copy (of a memory map nothing is read)."""
    n = len(tokens) // batch_size
    return tokens[:n * batch_size].reshape(batch_size, n).T


def batchify(tokens, batch_size):
    """PyTorch word_language_model's batchify: 1-D tokens -> [len // B, B], column b = stream b."""
    return np.ascontiguousarray(stream_views(np.asarray(tokens), batch_size))


class Group:
    """B parallel streams of T steps that start from a zero state.

    inputs   [T,B] int ids or [T,B,I] floats (host)
    targets  [T,B] int, [T,B,O] float (every step), or [B] int / [B,O] float (last step)
    resets   [T,B] bool or None: True where the state of that stream is zeroed before step t
    lengths  [B] int64 in 1..T or None: variable-length sequences, row b's steps t < lengths[b]
             (the model runs only those; per-step targets past them carry no loss)
    """

    def __init__(self, inputs, targets, every_step, resets=None, lengths=None):
        self.inputs, self.targets, self.every_step = inputs, targets, every_step
        self.T, self.B = inputs.shape[0], inputs.shape[1]
        self.ce = targets.dtype.kind in "iu"
        self.resets = resets
        rows = np.flatnonzero(resets.any(axis=1)) if resets is not None else np.empty(0, np.int64)
        self.reset_rows = rows[rows > 0]            # a reset at step 0 meets a zero state anyway
        self.lengths = lengths
        self.valid = None                           # [T,B] bool: the steps of per-step targets that count
        if lengths is not None and every_step:
            self.valid = np.arange(self.T)[:, None] < lengths[None, :]
            if self.ce:                             # class targets past a row's end: ignored (-1)
                self.targets = np.where(self.valid, targets, -1)

    def forward(self, model, s0, s1, state, train):
        """``model.forward`` over steps [s0, s1) -> (outputs, final state, cache); rows of
        variable length pass their lengths, which takes all the group's steps at once."""
        if self.lengths is None:
            return model.forward(self.inputs[s0:s1], state, train=train)
        if (s0, s1) != (0, self.T):
            raise ValueError(f"variable-length sequences run over all their {self.T} steps at once; "
                             f"got steps {s0}..{s1 - 1}")
        return model.forward(self.inputs, state, train=train, lengths=self.lengths)

    def segments(self, t0, t1):
        """Split [t0, t1) at reset rows -> list of (s0, s1, reset_here: bool)."""
        lo, hi = np.searchsorted(self.reset_rows, [t0, t1])
        rows = [int(r) for r in self.reset_rows[lo:hi]]      # reset rows in [t0, t1), sorted
        starts = [t0] + [r for r in rows if r > t0]
        ends = starts[1:] + [t1]
        return [(a, b, a in rows) for a, b in zip(starts, ends)]

    def count(self, t0, t1):
        """Number of loss terms in steps [t0, t1) (the mean's divisor)."""
        if not self.every_step:
            if t1 < self.T:
                return 0
            return losses.count_targets(self.targets) if self.ce else self.targets.size
        tg = self.targets[t0:t1]
        if self.ce:
            return losses.count_targets(tg)
        if self.valid is None:
            return tg.size
        return int(self.valid[t0:t1].sum()) * tg.shape[-1]      # MSE: O terms per valid step

    def loss(self, backend, out, s0, s1, count):
        """(loss, dout) of the outputs of steps [s0, s1), or (0.0, None) when they carry no loss."""
        if not self.every_step and s1 < self.T:
            return 0.0, None
        tg = self.targets[s0:s1] if self.every_step else self.targets
        if self.ce:
            return losses.cross_entropy(backend, out, tg, count, overwrite=True)
        if self.valid is not None:          # MSE over the valid steps: padded ones masked out of both
            keep = self.valid[s0:s1, :, None]
            return losses.mse(backend, out * backend.asarray(keep, out.dtype), tg * keep, count)
        return losses.mse(backend, out, tg, count)


class TokenRows:
    """Steps of B token streams, copied as int64 only when used.

    rows [T, B] int view of the 1-D ids (:func:`stream_views`; of a memory map nothing is read
    before a chunk is used); ``first``: the stream position of row 0 (1 for targets); ``n``: the
    length of a stream. ``self[s0:s1]`` is an int64 copy [s1 - s0, B] of those steps, its ids
    checked to be below ``vocab_size`` (an id outside is a DataError naming ``source`` and the
    id's position in the 1-D ids).
    """

    dtype = np.dtype(np.int64)

    def __init__(self, rows, first, n, vocab_size, source):
        self.rows, self.first, self.n, self.vocab_size, self.source = rows, first, n, vocab_size, source
        self.shape = rows.shape

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, steps):
        if not isinstance(steps, slice) or steps.step not in (None, 1):
            raise TypeError(f"token rows are read as a range of steps [s0:s1]; got {steps!r}")
        block = np.array(self.rows[steps], dtype=np.int64)          # the only copy: this chunk's ids
        if block.size and (block.min() < 0 or block.max() >= self.vocab_size):
            t, b = np.argwhere((block < 0) | (block >= self.vocab_size))[0]
            at = int(b) * self.n + self.first + steps.indices(self.shape[0])[0] + int(t)
            raise DataError(f"{self.source}: token id {int(block[t, b]):,} at position {at:,} is not in the "
                            f"model's vocabulary of {self.vocab_size:,} ids (a damaged token file? "
                            "bptt prepare --verify DIR checks one whole)")
        return block


class TokenGroup(Group):
    """The B streams of a LanguageModel's token ids [n, B] (a view, :func:`stream_views`): inputs
    the ids of steps 0..n-2, targets those of steps 1..n-1 (:class:`TokenRows`, copied chunk by
    chunk); ``resets`` [n-1, B] bool or None; ``source`` names the ids in errors."""

    def __init__(self, streams, resets, vocab_size, source):
        n = streams.shape[0]
        super().__init__(TokenRows(streams[:-1], 0, n, vocab_size, source),
                         TokenRows(streams[1:], 1, n, vocab_size, source), True, resets)

    def count(self, t0, t1):
        """Every step of every stream has a target (ids are >= 0): (t1 - t0) B, nothing read."""
        return (t1 - t0) * self.B


def _crc_of_rows(streams, crc):
    """CRC32 of ``streams`` [n, B] as int64 in C order (that of ``batchify(tokens)``'s bytes),
    continuing ``crc``, computed a block of rows at a time."""
    rows = max(1, (1 << 20) // streams.shape[1])
    for r0 in range(0, streams.shape[0], rows):
        crc = zlib.crc32(np.ascontiguousarray(streams[r0:r0 + rows], dtype=np.int64), crc)
    return crc


class Dataset:
    """Training or evaluation data prepared for a model: a list of groups and a fingerprint.

    Token streams are never copied whole: the B streams are views of the ids (of a memory map:
    a prepared corpus stays on disk), each chunk copied when it is used. The fingerprint of a
    :class:`bptt.token_file.TokenMemmap` of a whole token file is made of its header's CRC32 and
    length (nothing read); any other ids are hashed (a memory map without that header: read
    whole, block by block).
    """

    def __init__(self, model, data, batch_size, reset_mask=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        B = int(batch_size)
        self.batch_size = B
        crc = zlib.crc32(np.int64(B).tobytes())
        if isinstance(model, LanguageModel):
            checksum, on_disk = getattr(data, "checksum", None), isinstance(data, np.memmap)
            source = getattr(data, "filename", None) or "the token stream"
            tokens = np.asarray(data)                                          # no copy
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise ValueError(f"data for a LanguageModel must be a 1-D int token stream; "
                                 f"got {tokens.ndim}-D array of dtype {tokens.dtype}")
            # ids in memory are checked here; those of a memory map as each chunk is read
            if len(tokens) and not on_disk and (tokens.min() < 0 or tokens.max() >= model.vocab_size):
                raise ValueError(f"token ids must be in [0, {model.vocab_size}); got range "
                                 f"[{int(tokens.min())}, {int(tokens.max())}]")
            if len(tokens) // B < 2:
                raise ValueError(f"data has {len(tokens)} tokens: too few for batch_size {B} "
                                 f"(each of the {B} streams needs at least 2 tokens)")
            streams = stream_views(tokens, B)                                  # n,B view
            resets = None
            if reset_mask is not None:
                mask = np.asarray(reset_mask)
                if mask.shape != tokens.shape or mask.dtype != np.bool_:
                    raise ValueError(f"reset_mask must be a bool array of the data's shape {tokens.shape}; "
                                     f"got {mask.dtype} {mask.shape}")
                resets = batchify(mask, B)[:-1]
                crc = zlib.crc32(mask.tobytes(), crc)
            if checksum is not None:
                crc = zlib.crc32(f"{checksum} {len(tokens)} {tokens.dtype.str}".encode(), crc)
            else:
                crc = _crc_of_rows(streams, crc)
            self.groups = [TokenGroup(streams, resets, model.vocab_size, source)]
        elif isinstance(model, SequenceModel):
            if reset_mask is not None:
                raise ValueError("reset_mask applies to token streams; sequences of a SequenceModel "
                                 "always start from a zero state")
            if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
                raise ValueError("data for a SequenceModel must be (inputs [N,T,I], targets) or "
                                 "(inputs, targets, lengths [N])")
            inputs, targets = np.asarray(data[0]), np.asarray(data[1])
            if inputs.ndim != 3 or inputs.shape[2] != model.input_size or inputs.dtype.kind != "f":
                raise ValueError(f"inputs must be float [N, T, I] with I = {model.input_size}; "
                                 f"got {inputs.dtype} {inputs.shape}")
            N, T = inputs.shape[:2]
            if N < 1 or T < 1:
                raise ValueError(f"inputs must hold at least one sequence of at least one step; got shape {inputs.shape}")
            O = model.output_size
            every = model.readout == "every_step"
            ok = {True: {"i": (N, T), "f": (N, T, O)}, False: {"i": (N,), "f": (N, O)}}[every]
            kind = "i" if targets.dtype.kind in "iu" else targets.dtype.kind
            if ok.get(kind) != targets.shape:
                raise ValueError(f"targets for readout={model.readout!r} must be int {ok['i']} (cross-entropy) "
                                 f"or float {ok['f']} (MSE); got {targets.dtype} {targets.shape}")
            if kind == "i" and targets.max(initial=-1) >= O:
                raise ValueError(f"class targets must be < output_size {O}; got {int(targets.max())}")
            targets = targets.astype(np.int64) if kind == "i" else targets
            lengths = as_lengths("lengths", data[2], T, N) if len(data) == 3 else None      # N or None
            crc = zlib.crc32(targets.tobytes(), zlib.crc32(inputs.tobytes(), crc))
            if lengths is not None:
                crc = zlib.crc32(lengths.tobytes(), crc)
            self.groups = []
            for b0 in range(0, N, B):
                x = np.ascontiguousarray(inputs[b0:b0 + B].transpose(1, 0, 2))               # T,B,I
                y = targets[b0:b0 + B]
                y = np.ascontiguousarray(np.moveaxis(y, 0, 1)) if every else np.ascontiguousarray(y)
                self.groups.append(Group(x, y, every, lengths=None if lengths is None else lengths[b0:b0 + B]))
        else:
            raise TypeError(f"model must be a LanguageModel or SequenceModel; got {type(model).__name__}")
        self.fingerprint = int(crc)


# ------------------------------------------------------------------------------------------
# The ring buffer of chunk caches


class Segment:
    """A forward call over steps [s0, s1) of a group, kept for backward.

    cache  the model's cache; dout: dL/d(outputs) while its window is open (None: no loss);
    keep   [B] device 0/1 mask applied to the state entering s0 (None: no reset there)
    """

    __slots__ = ("s0", "s1", "cache", "dout", "keep")

    def __init__(self, s0, s1, cache, dout, keep):
        self.s0, self.s1, self.cache, self.dout, self.keep = s0, s1, cache, dout, keep

    def to_dict(self, to_host):
        return {"s0": self.s0, "s1": self.s1, "cache": self.cache.to_dict(to_host),
                "keep": None if self.keep is None else to_host(self.keep)}


class Record:
    """Steps [s0, s1) of a forward call over steps [start, start + steps) of a group, kept for
    a backward that recomputes them (``Trainer(memory=...)``, :mod:`bptt.memory`).

    keep       [B] device 0/1 mask applied to the state entering ``start`` (None: no reset there)
    rng_state  the dropout RNG's state when the call began (its masks are replayed from it)
    rows       the call's T*B (a language model folds its embedding as the call did)
    weights    None while the call's window is open (the model's weights), after its update the
               {name: array} the call's forward used (``rnn.*``, ``encoder.weight``)
    state      the state entering s0 (before a reset there), kept where a later window starts
    """

    __slots__ = ("s0", "s1", "start", "steps", "keep", "rng_state", "rows", "weights", "state")

    def __init__(self, s0, s1, start, steps, keep, rng_state=None, rows=0, weights=None, state=None):
        self.s0, self.s1, self.start, self.steps, self.keep = s0, s1, start, steps, keep
        self.rng_state, self.rows, self.weights, self.state = rng_state, rows, weights, state

    def to_dict(self, to_host):
        """Plain dict of host arrays and JSON-able values (:meth:`from_dict` on any backend)."""
        return {"s0": self.s0, "s1": self.s1, "start": self.start, "steps": self.steps, "rows": self.rows,
                "keep": None if self.keep is None else to_host(self.keep), "rng_state": copy.deepcopy(self.rng_state),
                "weights": None if self.weights is None else {k: to_host(v) for k, v in self.weights.items()},
                "state": None if self.state is None else [to_host(s) for s in _state_parts(self.state)]}

    @classmethod
    def from_dict(cls, d, model):
        be = model.backend
        weights = None if d["weights"] is None else {k: device_copy(be, v) for k, v in d["weights"].items()}
        return cls(int(d["s0"]), int(d["s1"]), int(d["start"]), int(d["steps"]),
                   None if d["keep"] is None else device_copy(be, d["keep"]), copy.deepcopy(d["rng_state"]),
                   int(d["rows"]), weights, _state_from_host(d["state"], model))


def _state_parts(state):
    return state if isinstance(state, tuple) else (state,)


def _state_from_host(parts, model):
    """The state of host arrays ``parts`` ([h] or [h, c]) on ``model``'s backend (None stays)."""
    if parts is None:
        return None
    parts = tuple(device_copy(model.backend, s) for s in parts)
    if len(parts) != (2 if model.cell == "lstm" else 1):
        raise ValueError(f"the carried state has {len(parts)} parts; a {model.cell} model's has "
                         f"{2 if model.cell == 'lstm' else 1}")
    return parts if model.cell == "lstm" else parts[0]


def reset_rows(state, keep):
    """state h [L,B,H] (or (h, c)) times keep [B] (0 = that stream resets); None stays None."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s * keep[None, :, None] for s in state)
    return state * keep[None, :, None]


class Position:
    """Where an epoch stands between two updates: group index, step within it, carried state,
    ring buffer segments, dropout RNG state, and the data it refers to."""

    __slots__ = ("group", "offset", "state", "ring", "rng_state", "fingerprint", "batch_size")

    def __init__(self, group, offset, state, ring, rng_state, fingerprint, batch_size):
        self.group, self.offset, self.state, self.ring = group, offset, state, ring
        self.rng_state, self.fingerprint, self.batch_size = rng_state, fingerprint, batch_size

    def to_dict(self, backend):
        """Plain dict of host arrays and JSON-able values: {"group", "offset", "fingerprint",
        "batch_size", "rng_state", "state": None or [h] / [h, c] ([L,B,H] each), "ring": [{"s0",
        "s1", "cache": the model cache's dict, "keep": [B] or None}] (with ``memory`` set: the
        :meth:`Record.to_dict` of each)}; any backend reads it."""
        def to_host(a):
            return host_copy(backend, a)

        state = self.state
        if state is not None:
            state = [to_host(s) for s in _state_parts(state)]
        ring = [seg.to_dict(to_host) for seg in self.ring]
        return {"group": self.group, "offset": self.offset, "fingerprint": self.fingerprint,
                "batch_size": self.batch_size, "rng_state": copy.deepcopy(self.rng_state),
                "state": state, "ring": ring}

    @classmethod
    def from_dict(cls, d, model):
        """The Position of :meth:`to_dict`'s dict ``d`` on ``model``'s backend; the ring's caches
        are rebuilt by ``model`` and belong to its layers."""
        be = model.backend
        state = _state_from_host(d["state"], model)
        ring = tuple(Record.from_dict(s, model) if "start" in s else
                     Segment(int(s["s0"]), int(s["s1"]), model.cache_from_dict(s["cache"]), None,
                             None if s["keep"] is None else device_copy(be, s["keep"])) for s in d["ring"])
        return cls(int(d["group"]), int(d["offset"]), state, ring, copy.deepcopy(d["rng_state"]),
                   int(d["fingerprint"]), int(d["batch_size"]))
