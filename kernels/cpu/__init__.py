"""bptt_kernels.cpu: the CPU backend, Numba ``@njit`` kernels (interface: ``bptt_kernels``).

One forward and one backward kernel per cell (``lstm.py``, ``gru.py``, ``rnn.py``), each
running all T steps of a layer in compiled code: the input projection of all steps is one
GEMM before the time loop, each step is one GEMM (h @ W_hh^T, or dgates @ W_hh backwards)
plus a fused gate loop, and the parameter gradients and dx are large GEMMs after the loop.
GEMMs call the CBLAS of NumPy's bundled OpenBLAS directly (``_blas.py``). float64 is exact
(libm tanh/exp); float32 uses a vectorised rational tanh (``_math.py``, error stated there).
Compiled code is cached on disk (``cache=True``), so only the first process compiles
(all four cells in both dtypes: ~10 s cold, ~0.6 s from the cache, on the 2-core dev machine).
The measured history behind each of these choices is in docs/performance.md.
"""

import numpy as np

from bptt_kernels.host import RecurrentCache
from bptt_kernels.host.checks import FLOAT_DTYPES as DTYPES

from ._blas import BLAS_LIBRARY
from ._loop import run_beside
from ._memory import keep_freed_memory
from .gru import gru_backward, gru_forward
from .linear import linear_backward, linear_forward
from .lstm import lstm_backward, lstm_forward
from .ops import (adam_step, embedding_backward, embedding_forward, scale_, sgd_step,
                  softmax_cross_entropy, sum_of_squares)
from .rnn import rnn_relu_backward, rnn_relu_forward, rnn_tanh_backward, rnn_tanh_forward

NAME = "cpu"
xp = np
TIME_BLOCKS = True       # gradient sums over time in the time blocks of host/blocks.py


def asarray(a, dtype):
    """A fresh C-contiguous numpy array of ``dtype`` holding ``a`` (always a copy, as a GPU
    backend's upload: later in-place updates never reach the caller's array)."""
    return np.array(a, dtype=dtype, order="C", copy=True)


def to_host(a):
    """A fresh numpy copy of ``a`` (as a GPU backend's download: no aliasing of live arrays)."""
    return np.array(a, copy=True)


def zeros(shape, dtype):
    """Zero-filled numpy array."""
    return np.zeros(shape, dtype)


__all__ = [
    "NAME", "xp", "DTYPES", "TIME_BLOCKS", "asarray", "to_host", "zeros", "BLAS_LIBRARY", "keep_freed_memory",
    "run_beside",
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
    "RecurrentCache",
    "softmax_cross_entropy", "linear_forward", "linear_backward",
    "embedding_forward", "embedding_backward",
    "sgd_step", "adam_step", "sum_of_squares", "scale_",
]
