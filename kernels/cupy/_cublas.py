"""The general path's per-step GEMMs, called on cuBLAS with the least host work.

The general path multiplies by W_hh twice per time step (forward ``h_{t-1} W_hh^T``, backward
``dg_h[t] W_hh``). ``cupy.matmul`` spends tens of microseconds of host time per call on its
argument handling, which at small sizes is most of a step. :class:`StepGemm` calls
``cublas<S|D>gemm`` directly: row-major arrays are read as their column-major transposes, so
``out = a @ op(w)`` is ``out^T = op(w)^T a^T`` with no copy.
"""

import numpy as np

OP_N, OP_T = 0, 1            # cublasOperation_t
POINTER_MODE_HOST = 0        # cublasPointerMode_t: alpha and beta are host addresses


def matmul_step_gemm(xp):
    """The same contract on ``xp.matmul`` (the host emulation; any array module)."""
    def gemm(a, w, out, transpose_w):
        xp.matmul(a, w.T if transpose_w else w, out=out)
    return gemm


class StepGemm:
    """``gemm(a, w, out, transpose_w)``: out [M, N] = a [M, K] @ w^T (w [N, K], transpose_w)
    or a @ w (w [K, N]); every array C-contiguous, out overwritten.

    cublas   cupy_backends.cuda.libs.cublas (sets the current stream on each call)
    handle   () -> the cuBLAS handle of the current device
    pointer  array -> its device address
    """

    def __init__(self, cublas, handle, pointer):
        self._cublas = cublas
        self._handle = handle
        self._pointer = pointer
        self._scalars = []  # alpha = 1, beta = 0 in host memory: cuBLAS reads them by address
        self._calls = {}    # dtype -> (gemm function, address of alpha, address of beta)
        for dtype, fn in ((np.float32, cublas.sgemm), (np.float64, cublas.dgemm)):
            one, zero = np.ones(1, dtype), np.zeros(1, dtype)
            self._scalars.append((one, zero))
            self._calls[np.dtype(dtype)] = (fn, one.ctypes.data, zero.ctypes.data)

    def __call__(self, a, w, out, transpose_w):
        M, K = a.shape
        N = out.shape[1]
        fn, one, zero = self._calls[a.dtype]
        handle = self._handle()
        self._cublas.setPointerMode(handle, POINTER_MODE_HOST)
        p = self._pointer
        if transpose_w:  # w [N, K] reads as [K, N] (ld K): op T gives the [N, K] needed
            fn(handle, OP_T, OP_N, N, M, K, one, p(w), K, p(a), K, zero, p(out), N)
        else:            # w [K, N] reads as [N, K] (ld N): as needed
            fn(handle, OP_N, OP_N, N, M, K, one, p(w), N, p(a), K, zero, p(out), N)
