"""The general path's per-step GEMMs, called on cuBLAS with the least host work.

The general path multiplies by W_hh twice per time step (forward ``h_{t-1} W_hh^T``, backward
``dg_h[t] W_hh``). ``cupy.matmul`` spends tens of microseconds of host time per call on its
argument handling, which at small sizes is most of a step. :class:`StepGemm` calls
``cublas<S|D>gemm`` directly: row-major arrays are read as their column-major transposes, so
``out = a @ op(w)`` is ``out^T = op(w)^T a^T`` with no copy. It calls the C library through
:class:`CublasLibrary`, since CuPy's own cuBLAS wrappers refuse to run while a stream is being
captured into a CUDA graph (CuPy 14: "calling cuBLAS API during stream capture is currently
unsupported"), which the general path's graphs (:mod:`._graphs`) need.
"""

import ctypes
import ctypes.util
import os

import numpy as np

OP_N, OP_T = 0, 1            # cublasOperation_t
POINTER_MODE_HOST = 0        # cublasPointerMode_t: alpha and beta are host addresses


def matmul_step_gemm(xp):
    """The same contract on ``xp.matmul`` (the host emulation; any array module)."""
    def gemm(a, w, out, transpose_w):
        xp.matmul(a, w.T if transpose_w else w, out=out)
    return gemm


def loaded_cublas():
    """The libcublas this process has loaded (importing CuPy's cuBLAS module loads it), as a
    ctypes library; where it cannot be told, the one the system's loader finds."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libcublas.so"):
                return ctypes.CDLL(path)
    name = ctypes.util.find_library("cublas")
    if name is None:
        raise OSError("libcublas is neither loaded in this process nor found by the loader")
    return ctypes.CDLL(name)


class CublasLibrary:
    """The three cuBLAS calls :class:`StepGemm` makes, on the C library (ctypes; ``lib``, by
    default :func:`loaded_cublas` at the first call): ``setPointerMode(handle, mode)``,
    ``sgemm`` / ``dgemm(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)``
    (addresses as ints). Each GEMM first sets the handle's stream to ``stream()`` (an address;
    CuPy's current stream), as CuPy's wrappers do; a status other than success raises
    RuntimeError."""

    def __init__(self, stream, lib=None):
        self._stream = stream
        self._library = lib

    @property
    def _lib(self):
        if self._library is None:
            self._library = loaded_cublas()
        return self._library

    @staticmethod
    def _check(name, status):
        if status != 0:
            raise RuntimeError(f"{name} failed with cublasStatus_t {status}")

    def setPointerMode(self, handle, mode):
        self._check("cublasSetPointerMode_v2",
                    self._lib.cublasSetPointerMode_v2(ctypes.c_void_p(handle), ctypes.c_int(mode)))

    def _gemm(self, name, handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        h = ctypes.c_void_p(handle)
        self._check("cublasSetStream_v2",
                    self._lib.cublasSetStream_v2(h, ctypes.c_void_p(self._stream())))
        i, p = ctypes.c_int, ctypes.c_void_p
        self._check(name, getattr(self._lib, name)(
            h, i(transa), i(transb), i(m), i(n), i(k), p(alpha), p(A), i(lda), p(B), i(ldb),
            p(beta), p(C), i(ldc)))

    def sgemm(self, *args):
        self._gemm("cublasSgemm_v2", *args)

    def dgemm(self, *args):
        self._gemm("cublasDgemm_v2", *args)


class StepGemm:
    """``gemm(a, w, out, transpose_w)``: out [M, N] = a [M, K] @ w^T (w [N, K], transpose_w)
    or a @ w (w [K, N]); every array C-contiguous, out overwritten.

    cublas   :class:`CublasLibrary` (or anything with its three calls)
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
