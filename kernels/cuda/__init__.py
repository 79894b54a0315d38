"""bptt_kernels.cuda: the Numba-CUDA backend (NAME = "cuda").

Implements the backend interface documented in ``bptt_kernels/__init__.py`` with Numba-CUDA
kernels. Importing this module imports ``numba.cuda``; the dispatcher does so only on request.

Device arrays (``xp``)
    On a real GPU: CuPy arrays (``xp = cupy``; CuPy is required), Numba kernels launched on
    CuPy's current stream. Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before
    ``numba.cuda`` is first imported): NumPy host arrays (``xp = numpy``), which the simulator
    runs the same kernels on, slowly. ``SIMULATOR`` says which.
Dtypes
    float32 and float64 (float64 is what the simulator's exact checks use).
Recurrent paths (``config.PATH``, see :mod:`bptt_kernels.cuda.config`)
    ``persistent``: one launch of one thread block runs all T steps with W_hh held in shared
    memory; for small B*H (see :func:`persistent_limits`). ``general`` (any size): the input
    projection of all steps as one GEMM, per step a GEMM ``h @ W_hh^T`` and one fused gate
    kernel (Haste's design), weight gradients as big GEMMs after the backward loop.
    ``auto`` picks persistent where it fits and B*H <= ``config.PERSISTENT_MAX_PAIRS``.
    Persistent size limits: one block's shared memory must hold
    ``(G*H*H + B*G*H + B*H) * itemsize`` bytes; largest H (at B = 1 / 8 / 64)::

                         lstm           gru            rnn
        227 KiB float32  119/115/86     138/133/102    240/233/185   (H100/H200, opt-in)
        227 KiB float64   84/80/54       97/93/64      169/162/118
         48 KiB float32   54/50/28       63/58/34      109/103/64    (no opt-in; simulator)
         48 KiB float64   38/34/16       44/40/19       77/70/37
Variable-length batches
    ``<cell>_forward(..., lengths=...)`` (int [B] in 1..T) on both paths: the kernels mask each
    row's padded steps themselves (compiled variants of their own, :mod:`.cells`); the cache
    carries the lengths and the backward follows them.
Caches
    The :class:`~bptt_kernels.host.RecurrentCache` of every backend (``tanh_c`` None: backward
    recomputes tanh(c)); ``extra["hs"]`` ([T+1,B,H], and ``extra["cs"]`` for the LSTM) holds
    h_0..h_T as the kernels read them, and ``y``, ``h0`` (``c``, ``c0``) are views of it (as the
    reference's y is its cache's y: do not modify them in place). A cache without ``extra``
    (made by another backend, or read from a checkpoint) is accepted.
"""

from ..host import RecurrentCache
from ..reference import linear_backward, linear_forward  # array operators: run on xp's arrays
from . import config
from ._device import DTYPES, SIMULATOR, asarray, to_host, xp, zeros
from .ops import (adam_step, embedding_backward, embedding_forward, scale_, sgd_step,
                  softmax_cross_entropy, sum_of_squares)
from .recurrent import backward, choose_path, forward, persistent_limits

NAME = "cuda"
TIME_BLOCKS = False      # gradient sums over the whole window in one block (host/blocks.py)


def lstm_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """LSTM over T steps. x [T,B,I], state (h0 [B,H], c0 [B,H]), w_ih [4H,I], w_hh [4H,H],
    b_ih/b_hh [4H], lengths [B] or None (row b runs steps 0 .. lengths[b]-1). Returns
    y [T,B,H], (h_T, c_T) (each row's after its own last step), RecurrentCache."""
    return forward("lstm", x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def lstm_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                  t_origin=0):
    """Backward of :func:`lstm_forward`; dfinal_state (dh_T, dc_T). Returns dx [T,B,I],
    (dh, dc) entering step t_start, dh [T,B,H]; dw_*/db_* accumulated."""
    return backward("lstm", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start,
                    t_origin)


def gru_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """GRU over T steps. x [T,B,I], state (h0 [B,H],), w_ih [3H,I], w_hh [3H,H], b_ih/b_hh [3H].
    Returns y [T,B,H], (h_T,), RecurrentCache."""
    return forward("gru", x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def gru_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                 t_origin=0):
    """Backward of :func:`gru_forward`; dfinal_state (dh_T,). Returns dx [T,B,I],
    (dh entering step t_start,), dh [T,B,H]; dw_*/db_* accumulated."""
    return backward("gru", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start,
                    t_origin)


def rnn_tanh_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """Elman RNN (tanh) over T steps. x [T,B,I], state (h0 [B,H],), w_ih [H,I], w_hh [H,H],
    b_ih/b_hh [H]. Returns y [T,B,H], (h_T,), RecurrentCache."""
    return forward("rnn_tanh", x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def rnn_tanh_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                      t_origin=0):
    """Backward of :func:`rnn_tanh_forward`; as :func:`gru_backward`."""
    return backward("rnn_tanh", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                    t_start, t_origin)


def rnn_relu_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """Elman RNN (relu) over T steps; as :func:`rnn_tanh_forward`."""
    return forward("rnn_relu", x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def rnn_relu_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                      t_origin=0):
    """Backward of :func:`rnn_relu_forward`; as :func:`gru_backward`."""
    return backward("rnn_relu", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                    t_start, t_origin)


__all__ = [
    "NAME", "xp", "DTYPES", "TIME_BLOCKS", "SIMULATOR", "config", "asarray", "to_host", "zeros",
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
    "RecurrentCache", "persistent_limits", "choose_path",
    "softmax_cross_entropy", "linear_forward", "linear_backward",
    "embedding_forward", "embedding_backward",
    "sgd_step", "adam_step", "sum_of_squares", "scale_",
]
