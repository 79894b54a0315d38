"""bptt_kernels.cpu: the CPU backend, Numba ``@njit`` kernels (interface: ``bptt_kernels``).

One forward and one backward kernel per cell (``lstm.py``, ``gru.py``, ``rnn.py``), each
running all T steps of a layer in compiled code: the input projection of all steps is one
GEMM before the time loop, each step is one GEMM (h @ W_hh^T, or dgates @ W_hh backwards)
plus a fused gate loop, and the parameter gradients and dx are large GEMMs after the loop.
GEMMs call the CBLAS of NumPy's bundled OpenBLAS directly (``_blas.py``). float64 is exact
(libm tanh/exp); float32 uses a vectorised rational tanh (``_math.py``, error stated there).
Compiled code is cached on disk (``cache=True``), so only the first process compiles.
"""

import numpy as np

from ._args import DTYPES
from ._blas import BLAS_LIBRARY
from .gru import GRUCache, gru_backward, gru_forward
from .lstm import LSTMCache, lstm_backward, lstm_forward
from .ops import (adam_step, embedding_backward, embedding_forward, scale_, sgd_step,
                  softmax_cross_entropy, sum_of_squares)
from .rnn import (RNNCache, rnn_relu_backward, rnn_relu_forward, rnn_tanh_backward,
                  rnn_tanh_forward)

NAME = "cpu"
xp = np


def asarray(a, dtype):
    """A C-contiguous numpy array of ``dtype`` (copied only if needed)."""
    return np.ascontiguousarray(a, dtype=dtype)


def to_host(a):
    """The array itself, as numpy.ndarray (the CPU backend's arrays already live on the host)."""
    return np.asarray(a)


def zeros(shape, dtype):
    """Zero-filled numpy array."""
    return np.zeros(shape, dtype)


__all__ = [
    "NAME", "xp", "DTYPES", "asarray", "to_host", "zeros", "BLAS_LIBRARY",
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
    "LSTMCache", "GRUCache", "RNNCache",
    "softmax_cross_entropy", "embedding_forward", "embedding_backward",
    "sgd_step", "adam_step", "sum_of_squares", "scale_",
]
