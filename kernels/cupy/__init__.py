"""bptt_kernels.cupy: the CuPy backend (CUDA C kernels through cupy.RawModule, GEMMs on cuBLAS).

Implements the backend interface of :mod:`bptt_kernels` (shapes and contracts documented
there) for float32 and float64 CuPy arrays.

Recurrent layers run one of three paths, chosen per call by size (``config.PATH = "auto"``) or
forced (``"persistent"`` / ``"cooperative"`` / ``"general"``; see
:mod:`bptt_kernels.cupy.config`):

* persistent: one kernel launch runs all T steps; each block owns a slice of the batch and
  keeps W_hh (and its hidden state) in shared memory across the steps, every dot product split
  over up to 8 threads. Used by "auto" for B <= config.PERSISTENT_MAX_BATCH where W_hh fits in
  the device's opt-in shared memory per block; on an H100 (227 KiB) with one batch row per
  block that is H <= 119 (LSTM), 138 (GRU), 239 (RNN) in float32 and H <= 84, 97, 168 in
  float64 (:func:`persistent_max_hidden`; :func:`choose_path` says which path a size takes).
* cooperative: one kernel launch runs all T steps; each block owns a slice of the hidden
  units (of every batch row) and keeps those units' weights of W_hh in shared memory, so W_hh
  is spread over the shared memory of all SMs (an H100's 132 x 227 KiB); the blocks meet at a
  grid-wide barrier once per step (at most one block per SM, so all are resident). It fits
  on an H100 in float32 for the LSTM up to H ~ 1280 at B = 1, 1080 at B = 16, 920 at B = 32
  (GRU 1440 / 1180 / 960, Elman RNN 2630 / 1840 / 1320). Used by "auto" where the persistent
  kernel is not, for 2 <= B and B * H <= 2048 (config.COOPERATIVE_MIN_BATCH /
  COOPERATIVE_MAX_STATE), where it fits.
* general (any size, Haste's design): the input projections of all steps as one GEMM, then per
  step one cuBLAS GEMM ``h @ W_hh^T`` (called directly, :mod:`._cublas`) and one fused gate
  kernel; backward likewise, with the weight gradients and dx as GEMMs over all steps after
  the loop. For B * H up to config.GRAPH_MAX_STATE each loop's 2 T launches are recorded once
  as a CUDA graph and replayed with one call (:mod:`._graphs`).

float32 GEMMs run in float32 (CuPy's default compute type): setting CUPY_TF32=1 would trade
the 1e-5 float32 parity for TensorFloat-32 speed.

Variable-length batches (``lengths`` [B]) run on all three paths: every kernel masks each
row's padded steps itself (recurrent.cu), the padded rows riding along in the per-step GEMMs.

All three paths save the same cache, the :class:`~bptt_kernels.host.RecurrentCache` every
backend shares (``tanh_c`` None: backward recomputes tanh(c)), so a forward on one path can be
followed by a backward on another, or on a cache made by another backend or read from a
checkpoint. Kernel sources: recurrent.cu, ops.cu (+ common.cu), shipped
as package data and compiled on first use (importing this module compiles and allocates nothing).
Without a GPU, :func:`bptt_kernels.cupy.host_emulation.host_backend` runs this backend's code
with the same kernel sources built for the CPU (how the tests check it).
"""

import cupy
import numpy as np

from ..host import RecurrentCache
from ..reference import linear_backward, linear_forward  # array operators: run on cupy arrays
from . import config
from ._compile import CupyLauncher, cupy_device_limits
from ._cublas import CublasLibrary, StepGemm
from ._engine import DTYPES as _ENGINE_DTYPES
from ._engine import Engine
from ._plan import persistent_max_hidden, persistent_smem_bytes
from ._graphs import cupy_capture

NAME = "cupy"
xp = cupy
DTYPES = _ENGINE_DTYPES  # (float32, float64)
TIME_BLOCKS = False      # gradient sums over the whole window in one block (host/blocks.py)

_gpu_engine = None


def _get():
    """The GPU engine, built on first use (building it compiles nothing)."""
    global _gpu_engine
    if _gpu_engine is None:
        cublas = CublasLibrary(lambda: cupy.cuda.get_current_stream().ptr)
        step_gemm = StepGemm(cublas, cupy.cuda.device.get_cublas_handle, lambda a: a.data.ptr)
        _gpu_engine = Engine(cupy, CupyLauncher(), cupy_device_limits, cupy.asnumpy, step_gemm,
                             cupy_capture)
    return _gpu_engine


# ---- array plumbing ----

def asarray(a, dtype):
    """Copy a host array-like (or a CuPy array) into a C-contiguous CuPy array of ``dtype``."""
    return _get().asarray(a, dtype)


def to_host(a):
    """CuPy array -> numpy.ndarray."""
    return cupy.asnumpy(a)


def zeros(shape, dtype):
    """Zero-filled CuPy array."""
    return cupy.zeros(shape, dtype=np.dtype(dtype))


# ---- recurrent layers ----

def choose_path(cell, B, H, dtype):
    """"persistent", "cooperative" or "general": the path a recurrent call of these sizes takes
    on the current device under ``config.PATH`` (a ValueError where a forced path cannot fit)."""
    return _get().choose_path(cell, B, H, dtype)


def _cell_functions(cell):
    def forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
        return _get().recurrent_forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, lengths)

    def backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                 t_origin=0):
        return _get().recurrent_backward(cell, dy, dfinal_state, cache, w_ih, w_hh,
                                         dw_ih, dw_hh, db_ih, db_hh, t_start, t_origin)

    forward.__name__ = forward.__qualname__ = f"{cell}_forward"
    backward.__name__ = backward.__qualname__ = f"{cell}_backward"
    forward.__doc__ = (f"{cell} forward over all T steps: x [T,B,I] -> y [T,B,H], final state, "
                       "RecurrentCache. Contract: bptt_kernels.__init__.")
    backward.__doc__ = (f"{cell} backward from t = T-1 down to t_start: returns dx [T,B,I], "
                        "dstate, dh [T,B,H]; accumulates dw_ih, dw_hh, db_ih, db_hh. "
                        "Contract: bptt_kernels.__init__.")
    return forward, backward


lstm_forward, lstm_backward = _cell_functions("lstm")
gru_forward, gru_backward = _cell_functions("gru")
rnn_tanh_forward, rnn_tanh_backward = _cell_functions("rnn_tanh")
rnn_relu_forward, rnn_relu_backward = _cell_functions("rnn_relu")


# ---- non-recurrent pieces ----

def softmax_cross_entropy(logits, targets, dlogits, scale):
    """Fused softmax + cross-entropy, one block per row: logits [N,V], targets [N] int (< 0
    ignored) -> loss sum (float); writes dlogits [N,V] (may alias logits)."""
    return _get().softmax_cross_entropy(logits, targets, dlogits, scale)


def embedding_forward(weight, ids):
    """weight [V,E], ids int [...] -> weight[ids] [..., E]."""
    return _get().embedding_forward(weight, ids)


def embedding_backward(dweight, ids, dout):
    """dweight [V,E] += scatter-add (atomicAdd) of dout [..., E] at ids [...]."""
    _get().embedding_backward(dweight, ids, dout)


def sgd_step(param, grad, buf, lr, momentum, weight_decay, nesterov, first):
    """torch.optim.SGD step in place (dampening 0)."""
    _get().sgd_step(param, grad, buf, lr, momentum, weight_decay, nesterov, first)


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """torch.optim.Adam step in place (L2 weight decay, bias correction, step from 1)."""
    _get().adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)


def sum_of_squares(arrays):
    """Sum of a**2 over all elements of all arrays, accumulated in float64 (a Python float)."""
    return _get().sum_of_squares(arrays)


def scale_(arrays, factor):
    """In place a *= factor for every array."""
    _get().scale_(arrays, factor)


__all__ = [
    "NAME", "xp", "DTYPES", "TIME_BLOCKS", "asarray", "to_host", "zeros", "config", "RecurrentCache",
    "persistent_smem_bytes", "persistent_max_hidden", "choose_path",
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
    "softmax_cross_entropy", "linear_forward", "linear_backward",
    "embedding_forward", "embedding_backward",
    "sgd_step", "adam_step", "sum_of_squares", "scale_",
]
