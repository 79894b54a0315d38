"""Argument checks of the CPU backend's non-recurrent functions (ops.py, linear.py); the
recurrent layers' checks are shared by every backend (``bptt_kernels.host.checks``).

Wrong shapes or dtypes raise ValueError/TypeError naming the argument, the expected and the
actual value, before any compiled code runs.
"""

import operator

import numpy as np

from bptt_kernels.host.checks import FLOAT_DTYPES as DTYPES


def as_input(name, a, dtype=None, shape=None):
    """``a`` as a C-contiguous ndarray (copied only if needed), checked against dtype/shape.

    ``shape`` entries may be None (any size). A dtype mismatch raises TypeError: inputs are
    never cast silently.
    """
    arr = np.asarray(a)
    if dtype is None:
        if arr.dtype not in DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")
    elif arr.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
    check_shape(name, arr, shape)
    return np.ascontiguousarray(arr)


def as_output(name, a, dtype, shape):
    """``a`` must be a writable C-contiguous ndarray of dtype (None: float32 or float64) and
    shape (entries None: any size), as it is written in place."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (written in place), got {type(a).__name__}")
    if dtype is None:
        if a.dtype not in DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    elif a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    check_shape(name, a, shape)
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name} must be a writable C-contiguous array (it is updated in place)")
    return a


def check_shape(name, arr, shape):
    if shape is None:
        return
    ok = arr.ndim == len(shape)
    if ok:                      # a plain loop: a generator under all() cost ~1 us per call
        for s, n in zip(shape, arr.shape):
            if s is not None and s != n:
                ok = False
                break
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(arr.shape)}")


def as_index(name, value, low, high):
    """An int in [low, high]."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= v <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {v}")
    return v
