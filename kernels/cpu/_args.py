"""Argument checks of the CPU backend's non-recurrent functions (ops.py, linear.py): the
host layer's checks (``bptt_kernels.host.checks``) with NumPy as the array module; an input
may be any array-like (converted by ``numpy.asarray``, never cast)."""

import numpy as np

from bptt_kernels.host.checks import as_array, as_index, check_shape  # noqa: F401 -- re-exported
from bptt_kernels.host.checks import as_output as _as_output


def as_input(name, a, dtype=None, shape=None):
    """``a`` as a C-contiguous ndarray of ``dtype`` (None: float32 or float64) and ``shape``."""
    return as_array(name, np.asarray(a), np, dtype, shape)


def as_output(name, a, dtype=None, shape=None):
    """A writable C-contiguous ndarray of ``dtype`` and ``shape``, updated in place."""
    return _as_output(name, a, np, dtype, shape)
