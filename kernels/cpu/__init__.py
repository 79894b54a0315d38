"""bptt_kernels.cpu: the CPU backend, Numba ``@njit`` kernels (interface: ``bptt_kernels``).

One forward and one backward kernel per cell (``lstm.py``, ``gru.py``, ``rnn.py``), each
running all T steps of a layer in compiled code: the input projection of all steps is one
GEMM before the time loop, each step is one GEMM (h @ W_hh^T, or dgates @ W_hh backwards)
plus a fused gate loop, and the parameter gradients and dx are large GEMMs after the loop.
GEMMs call the CBLAS of NumPy's bundled OpenBLAS directly (``_blas.py``). float64 is exact
(libm tanh/exp); float32 uses a vectorised rational tanh (``_math.py``, error stated there).
Compiled code is cached on disk (``cache=True``), so only the first process compiles
(all four cells in both dtypes: ~10 s cold, ~0.6 s from the cache, on the 2-core dev machine).

Where the time goes and what was measured (float32, T=100, one thread, CPU time; the dev
machine's cores were shared, so only ratios are meaningful):

* GEMM calls: CBLAS of NumPy's OpenBLAS from compiled code (``_blas.py``), ~100 GFLOP/s for
  the large GEMMs (= SGEMM 2048^3 on this machine). LSTM B=128, H=1024: 80% of SGEMM's
  GFLOP/s on one thread.
* Per-step GEMM layout (``_blas.step_weight``): each piece of a time loop packs its share of
  W_hh^T once per layer call into contiguous 64-wide panels, one sgemm per panel, K-block and
  step under OpenBLAS's small-matrix size (LSTM B=8 H=1024 T=100 step 452 -> 291 ms; the
  transposed copy of W_hh this replaced cost 31 ms per layer call at H=1024; K-blocks in place
  of whole-segment sgemm at many rows: [128,1024] @ [1024,2048] 87 -> 95-103 GFLOP/s); one
  batch row (B = 1) calls sgemv on W_hh in place, with no packing (LSTM H = 128 forward time
  loop 0.43 -> 0.35 ms); calls of under 8 steps use W_hh in place.
* Input projections of few rows split by output columns (``_common.project_inputs``); a
  model's decoder on the same threads (``linear.py``); a caller may project the input itself
  (``w_ih=None``: a language model's folded embedding).
* Gate loops: gate blocks as 1-D views (41 -> 2.5 ns per element for the LSTM forward: plain
  ``g[k*H + j]`` indexing kept LLVM from vectorising), ``error_model="numpy"`` (a division's
  zero check also blocks vectorisation: float32 tanh 3.5 -> 0.36 ns), typed constants.
* Threads (``_loop.py``): each phase of a layer call (input projection, time loop split by
  batch rows, weight gradients and dx) runs in pieces on our own threads with OpenBLAS
  single-threaded, so threads meet once per phase, never per step or per GEMM. LSTM B=32,
  H=128, 2 threads: 27.5 -> ~20-23 ms against OpenBLAS's own threads (whose per-step
  synchronisation and spin-waiting made single step GEMMs 6-30x slower on the busy machine).
* Softmax cross-entropy: vectorised float32 exp (N=700, V=10000: 28 -> 9 ms).
* Fewer than 2 batch rows per thread, or few rows and a large W_hh: the time loop is split
  by hidden units with a spin barrier per step (``_loop.py``, ``_barrier.py``; LSTM B=1
  H=512 step 36 -> 21 ms). Gate loops one per output over per-unit views, so each vectorises
  (LSTM cell 24 -> 2.9 ns per unit).
* One batch row and a W_hh too small to split: the time loop runs on one thread and the
  GEMM phases beside it on another (``_common.forward_phases/backward_phases``: the input
  projection in growing pieces ahead of the loop, the weight gradients and dx in pieces of
  finished steps behind it). T=100, B=1, forward / backward ms, in-process A/B: LSTM H=128
  0.51-0.57/0.55-0.73 -> 0.42-0.50/0.42-0.49, GRU H=128 0.38-0.43/0.47-0.53 ->
  0.33-0.38/0.33-0.39, Elman H=256 0.43-0.63/0.57-0.64 -> 0.37-0.43/0.40-0.47 (H=128, too
  small to split its forward: backward 0.19 -> 0.13).
* Memory: backward's gate gradients are reused per-thread scratch (``_args.scratch``), and
  freed large arrays stay in the heap (``_memory.py``): char-LM update 84-93 -> 75 ms.
"""

import numpy as np

from ._args import DTYPES
from ._blas import BLAS_LIBRARY
from ._memory import KEEPS_FREED_MEMORY
from .gru import GRUCache, gru_backward, gru_forward
from .linear import linear_backward, linear_forward
from .lstm import LSTMCache, lstm_backward, lstm_forward
from .ops import (adam_step, embedding_backward, embedding_forward, scale_, sgd_step,
                  softmax_cross_entropy, sum_of_squares)
from .rnn import (RNNCache, rnn_relu_backward, rnn_relu_forward, rnn_tanh_backward,
                  rnn_tanh_forward)

NAME = "cpu"
xp = np


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
    "NAME", "xp", "DTYPES", "asarray", "to_host", "zeros", "BLAS_LIBRARY", "KEEPS_FREED_MEMORY",
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
    "LSTMCache", "GRUCache", "RNNCache",
    "softmax_cross_entropy", "linear_forward", "linear_backward",
    "embedding_forward", "embedding_backward",
    "sgd_step", "adam_step", "sum_of_squares", "scale_",
]
