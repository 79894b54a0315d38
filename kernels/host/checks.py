"""Argument checks, written once for every backend.

:func:`as_array`, :func:`as_output`, :func:`as_index` and :func:`check_shape` check one
argument (any backend's non-recurrent functions use them too); :func:`check_forward` and :func:`check_backward` run once per call, before any kernel, and
return the arguments normalised (C-contiguous arrays of the backend, a state of zeros for
``None``, ``t_start`` as an int) with the sizes T, B, I, H, G. Every error names the
argument, the expected and the actual value:

* an array that is not the backend's (``xp.ndarray``), a wrong dtype, a non-int t_start,
  a state that is not a tuple, a cache that is not a :class:`RecurrentCache` -> TypeError
* a wrong number of dimensions or shape, an out-of-range t_start, a state tuple of the
  wrong length, a cache of another cell, an unknown cell -> ValueError
* ``lengths`` (:func:`as_lengths`): not of an integer dtype -> TypeError; not of shape [B],
  or a value outside [1, T] -> ValueError
"""

import operator
from typing import Any, NamedTuple

import numpy as np

from .cache import CELL_FIELDS, RecurrentCache, field_shapes
from .cells import CELLS, GATES, STATE_PARTS

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ForwardCall(NamedTuple):
    """A checked ``<cell>_forward`` call: arrays of the backend, C-contiguous."""
    x: Any          # [T,B,I], or [T,B,G*H] where w_ih is None
    state: tuple    # (h0,) or (h0, c0), [B,H] each
    w_ih: Any       # [G*H,I] or None
    w_hh: Any       # [G*H,H]
    b_ih: Any       # [G*H]
    b_hh: Any       # [G*H]
    T: int
    B: int
    I: int
    H: int
    G: int
    lengths: Any = None  # int64 [B] host array (numpy), or None: every row runs all T steps


class BackwardCall(NamedTuple):
    """A checked ``<cell>_backward`` call (gradient buffers are checked, never copied)."""
    dy: Any             # [T,B,H]
    dfinal_state: tuple  # like the state
    cache: RecurrentCache
    w_ih: Any           # [G*H,I] or None
    w_hh: Any           # [G*H,H]
    dw_ih: Any          # [G*H,I] or None, +=
    dw_hh: Any          # [G*H,H] +=
    db_ih: Any          # [G*H] +=
    db_hh: Any          # [G*H] +=
    t_start: int
    T: int
    B: int
    I: int
    H: int
    G: int
    t_origin: int = 0   # the stream's step of step 0 (the time blocks of the gradient sums)


def _shape_text(shape):
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_cell(cell):
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")


def check_input_weight_pair(w_ih, dw_ih):
    """A backward's w_ih and dw_ih are both arrays, or both None (the input was projected by
    the caller); ValueError otherwise."""
    if (w_ih is None) != (dw_ih is None):
        raise ValueError("w_ih and dw_ih must both be None (input projected by the caller) "
                         "or both arrays")


def check_shape(name, a, shape):
    """ValueError unless ``a``'s shape is ``shape`` (None entries: any size; shape None: any)."""
    if shape is None:
        return
    ok = a.ndim == len(shape)
    if ok:                      # a plain loop: a generator under all() costs ~1 us per call
        for s, n in zip(shape, a.shape):
            if s is not None and s != n:
                ok = False
                break
    if not ok:
        want = _shape_text("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {_shape_text(a.shape)}")


def _check_dtype(name, a, dtype):
    if dtype is None:
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    elif a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")


def as_array(name, a, xp, dtype=None, shape=None):
    """``a`` as a C-contiguous array of the backend (copied only if it is not), checked against
    ``dtype`` (None: float32 or float64) and ``shape`` (see :func:`check_shape`)."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray (use the backend's asarray), "
                        f"got {type(a).__name__}")
    _check_dtype(name, a, dtype)
    check_shape(name, a, shape)
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)


def as_output(name, a, xp, dtype=None, shape=None):
    """A buffer updated in place: the backend's array of ``dtype`` and ``shape``, writable and
    C-contiguous."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray (written in place), "
                        f"got {type(a).__name__}")
    _check_dtype(name, a, dtype)
    check_shape(name, a, shape)
    if not a.flags.c_contiguous or not getattr(a.flags, "writeable", True):
        raise ValueError(f"{name} must be a writable C-contiguous array (it is updated in place)")
    return a


def _state(name, state, cell, B, H, dtype, xp):
    """A tuple of the cell's [B,H] state parts; None: zeros."""
    parts = STATE_PARTS[cell]
    if state is None:
        return tuple(xp.zeros((B, H), dtype=dtype) for _ in parts)
    what = "(" + ", ".join(parts) + (",)" if len(parts) == 1 else ")")
    if not isinstance(state, (tuple, list)):
        raise TypeError(f"{name} must be a tuple {what} of [B, H] arrays for {cell}, "
                        f"got {type(state).__name__}")
    if len(state) != len(parts):
        raise ValueError(f"{name} must be a tuple {what} of [B, H] arrays for {cell}, "
                         f"got {len(state)} arrays")
    return tuple(as_array(f"{name}[{k}] ({p})", s, xp, dtype, (B, H))
                 for k, (p, s) in enumerate(zip(parts, state)))


def as_index(name, value, low, high):
    """An int in [low, high] (high None: no upper bound; bool refused)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if v < low or (high is not None and v > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {v}")
    return v


def as_lengths(name, lengths, T, B):
    """``lengths`` (any array-like of integers, on the host) as a fresh int64 numpy array of
    shape [B] with every value in [1, T]; None stays None. TypeError for a non-integer dtype
    (bool included), ValueError for a wrong shape or a value out of range."""
    if lengths is None:
        return None
    a = np.asarray(lengths)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an array of integers (the steps of each batch row), "
                        f"got dtype {a.dtype}")
    if a.shape != (B,):
        raise ValueError(f"{name} must have shape [{B}] (one length per batch row), "
                         f"got {_shape_text(a.shape)}")
    bad = np.flatnonzero((a < 1) | (a > T))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"{name} must be in [1, {T}], got {int(a[b])} at row {b}")
    return np.array(a, dtype=np.int64, copy=True)


def _check_cache(cell, cache, xp):
    """The cache with every field its cell uses checked (the backend's arrays, one dtype,
    consistent shapes) and made C-contiguous: a cache may come from another backend or a
    checkpoint, and the kernels read its arrays through raw pointers."""
    for f in CELL_FIELDS[cell]:
        if getattr(cache, f) is None:
            raise ValueError(f"a {cell} cache needs cache.{f}, got None")
    x = as_array("cache.x", cache.x, xp, None, (None, None, None))
    y = as_array("cache.y", cache.y, xp, x.dtype, (x.shape[0], x.shape[1], None))
    shapes = field_shapes(cell, *x.shape, y.shape[2])
    fields = {f: as_array(f"cache.{f}", getattr(cache, f), xp, x.dtype, shapes[f])
              for f in CELL_FIELDS[cell] + ("tanh_c",) if getattr(cache, f) is not None}
    changed = {f: a for f, a in fields.items() if a is not getattr(cache, f)}
    if cache.lengths is not None:
        lengths = as_lengths("cache.lengths", cache.lengths, x.shape[0], x.shape[1])
        if not (isinstance(cache.lengths, np.ndarray) and cache.lengths.dtype == np.int64
                and cache.lengths.flags.c_contiguous):
            changed["lengths"] = lengths
    return cache._replace(**changed) if changed else cache


def check_forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, xp, dtypes=FLOAT_DTYPES,
                  lengths=None):
    """Check a ``<cell>_forward`` call on a backend of array module ``xp`` that computes in
    ``dtypes``; return its :class:`ForwardCall`. w_ih None: x is x W_ih^T [T,B,G*H].
    ``lengths``: host integers [B] in [1, T] (:func:`as_lengths`), or None."""
    check_cell(cell)
    G = GATES[cell]
    x = as_array("x", x, xp, None, (None, None, None))
    if x.dtype not in dtypes:
        raise TypeError(f"x has dtype {x.dtype}, which this backend does not compute in "
                        f"(it does {', '.join(str(d) for d in dtypes)})")
    T, B, I = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"x must have at least one time step and one batch row, "
                         f"got shape {_shape_text(x.shape)}")
    w_hh = as_array("w_hh", w_hh, xp, x.dtype, (None, None))
    H = w_hh.shape[1]
    if H < 1 or w_hh.shape[0] != G * H:
        raise ValueError(f"w_hh must have shape [G*H, H] with G={G} for {cell}, "
                         f"got {_shape_text(w_hh.shape)}")
    if w_ih is None:
        as_array("x (projected: w_ih is None)", x, xp, x.dtype, (T, B, G * H))
    else:
        w_ih = as_array("w_ih", w_ih, xp, x.dtype, (G * H, I))
    b_ih = as_array("b_ih", b_ih, xp, x.dtype, (G * H,))
    b_hh = as_array("b_hh", b_hh, xp, x.dtype, (G * H,))
    state = _state("state", state, cell, B, H, x.dtype, xp)
    lengths = as_lengths("lengths", lengths, T, B)
    return ForwardCall(x, state, w_ih, w_hh, b_ih, b_hh, T, B, I, H, G, lengths)


def check_backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                   t_start, xp, t_origin=0):
    """Check a ``<cell>_backward`` call; return its :class:`BackwardCall`. w_ih and dw_ih
    both None: the input was projected by the caller."""
    check_cell(cell)
    if not isinstance(cache, RecurrentCache):
        raise TypeError(f"cache must be the RecurrentCache returned by {cell}_forward, "
                        f"got {type(cache).__name__}")
    if cache.cell != cell:
        raise ValueError(f"cache comes from {cache.cell}_forward, not {cell}_forward")
    G = GATES[cell]
    cache = _check_cache(cell, cache, xp)
    T, B, I = cache.x.shape
    H = cache.y.shape[2]
    dtype = cache.y.dtype
    t_start = as_index("t_start", t_start, 0, T - 1)
    t_origin = as_index("t_origin", t_origin, 0, None)
    dy = as_array("dy", dy, xp, dtype, (T, B, H))
    dfinal_state = _state("dfinal_state", dfinal_state, cell, B, H, dtype, xp)
    check_input_weight_pair(w_ih, dw_ih)
    if w_ih is not None:
        w_ih = as_array("w_ih", w_ih, xp, dtype, (G * H, I))
        as_output("dw_ih", dw_ih, xp, dtype, (G * H, I))
    w_hh = as_array("w_hh", w_hh, xp, dtype, (G * H, H))
    as_output("dw_hh", dw_hh, xp, dtype, (G * H, H))
    as_output("db_ih", db_ih, xp, dtype, (G * H,))
    as_output("db_hh", db_hh, xp, dtype, (G * H,))
    return BackwardCall(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                        t_start, T, B, I, H, G, t_origin)
