"""The one cache layout: what a recurrent forward saves for its backward, on every backend.

Checkpoints store a cache field by field (:func:`cache_to_arrays`), so a cache saved on one
backend is read by any other (:func:`cache_from_arrays`).
"""

from typing import Any, NamedTuple

import numpy as np

from .cells import CELLS, GATES


class RecurrentCache(NamedTuple):
    """Activations saved by ``<cell>_forward`` for ``<cell>_backward`` (arrays of the backend).

    cell    str        "lstm" | "gru" | "rnn_tanh" | "rnn_relu"
    x       [T,B,I]    the layer input (the caller's array, not copied), or x W_ih^T
                       [T,B,G*H] where the caller projected the input (w_ih None)
    h0      [B,H]      the initial hidden state
    c0      [B,H]      the initial cell state (LSTM; None otherwise)
    y       [T,B,H]    hidden states h_1 .. h_T (the returned y; the Elman RNN's act' is
                       computed from it)
    gates   [T,B,G*H]  activated gates: LSTM i, f, g, o; GRU r, z, n (None for the Elman RNN)
    c       [T,B,H]    LSTM cell states c_1 .. c_T (None otherwise)
    tanh_c  [T,B,H]    LSTM tanh(c_t), kept by the backends that save it (reference, cpu);
                       None where a backend recomputes it in backward (or a cache comes
                       from one): a backend that wants it computes it from c
    hn      [T,B,H]    GRU h_{t-1} W_hn^T + b_hn, the term r multiplies (None otherwise)
    lengths [B]        int64 host array (numpy on every backend): the steps of each batch
                       row (``<cell>_forward(..., lengths=...)``), or None: T for every row.
                       At a row's padded steps t >= lengths[b], y, gates, c, tanh_c and hn
                       hold zeros.
    extra   dict       a backend's private views of the arrays above (the Numba-CUDA
                       backend's h_0..h_T in one [T+1,B,H] array), or None. Derived, never
                       saved: a backend rebuilds what it lacks from the named fields.
    """
    cell: str
    x: Any
    h0: Any
    c0: Any = None
    y: Any = None
    gates: Any = None
    c: Any = None
    tanh_c: Any = None
    hn: Any = None
    lengths: Any = None
    extra: Any = None


ARRAY_FIELDS = tuple(f for f in RecurrentCache._fields if f not in ("cell", "extra"))

# the fields each cell's forward fills (tanh_c: LSTM, where a backend keeps it)
CELL_FIELDS = {
    "lstm": ("x", "h0", "c0", "y", "gates", "c"),
    "gru": ("x", "h0", "y", "gates", "hn"),
    "rnn_tanh": ("x", "h0", "y"),
    "rnn_relu": ("x", "h0", "y"),
}


def field_shapes(cell, T, B, I, H):
    """{field: shape} of a ``cell`` cache of T steps, batch B, input width I (G*H where the
    caller projected the input) and hidden size H."""
    G = GATES[cell]
    return {"x": (T, B, I), "h0": (B, H), "c0": (B, H), "y": (T, B, H), "gates": (T, B, G * H),
            "c": (T, B, H), "tanh_c": (T, B, H), "hn": (T, B, H)}


def cache_to_arrays(cache, to_host):
    """(cell, {field: host array}) of ``cache``'s arrays (fields that are None left out;
    ``lengths``, a host array already, as a copy of int64)."""
    arrays = {f: to_host(getattr(cache, f)) for f in ARRAY_FIELDS
              if f != "lengths" and getattr(cache, f) is not None}
    if cache.lengths is not None:
        arrays["lengths"] = np.array(cache.lengths, dtype=np.int64, copy=True)
    return cache.cell, arrays


def cache_from_arrays(cell, arrays, asarray):
    """The :class:`RecurrentCache` of ``cell`` from {field: host array}, each array through
    ``asarray(a)`` onto a backend (``lengths`` stays a host int64 array). Unknown cells or
    fields raise ValueError."""
    if cell not in CELLS:
        raise ValueError(f"cache cell must be one of {CELLS}, got {cell!r}")
    unknown = sorted(set(arrays) - set(ARRAY_FIELDS))
    if unknown:
        raise ValueError(f"unknown cache fields {unknown}; a cache has {list(ARRAY_FIELDS)}")
    missing = [f for f in ("x", "h0", "y") if f not in arrays]
    if missing:
        raise ValueError(f"a {cell} cache needs the fields {missing}")
    fields = {f: asarray(a) for f, a in arrays.items() if f != "lengths"}
    if arrays.get("lengths") is not None:                # stays on the host, as int64
        fields["lengths"] = np.array(arrays["lengths"], dtype=np.int64, copy=True)
    return RecurrentCache(cell, **fields)
