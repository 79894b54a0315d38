"""Matrix products for the recurrent layers (the input projection and the per-step GEMMs).

Numba-CUDA has no cuBLAS binding, so this module has its own simple tiled GEMM kernel
(shared-memory tiles, one output element per thread). On a real GPU the default is cuBLAS
through CuPy on the same arrays (``cupy.matmul``; ``cupy.cublas.gemm`` with beta = 1 where the
product accumulates into its output); ``config.GEMM`` forces either.

Plain reference beside the kernel (llm.c style), checked in tests/cudasim/test_ops.py:
``matmul(a, b, c, trans_a, trans_b, accumulate)``  ==  ``c[...] = op(a) @ op(b) (+ c)``

The GEMMs after the backward loop are not here: :func:`bptt_kernels.host.finish_backward`
runs them on ``xp`` for every backend.
"""

import functools

import numpy as np
from numba import cuda

from . import _device, config
from ._device import NUMBA_DTYPE
from ._device import ZERO as _ZERO


@functools.lru_cache(maxsize=None)
def _gemm_kernel(tile, dtype):
    """The tiled GEMM kernel for square tiles of edge ``tile`` and element type ``dtype``."""
    nb_dtype = NUMBA_DTYPE[np.dtype(dtype)]

    @cuda.jit
    def gemm(a, b, c, trans_a, trans_b, accumulate):
        # a: [M,K] ([K,M] if trans_a)   b: [K,N] ([N,K] if trans_b)   c: [M,N]
        # c = op(a) @ op(b)  (+ c if accumulate);  block (tile, tile), grid over c's tiles
        a_tile = cuda.shared.array((tile, tile), nb_dtype)  # op(a)[row, k0:k0+tile]
        b_tile = cuda.shared.array((tile, tile), nb_dtype)  # op(b)[k0:k0+tile, col]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.y * tile + ty
        col = cuda.blockIdx.x * tile + tx
        M = c.shape[0]
        N = c.shape[1]
        K = a.shape[0] if trans_a else a.shape[1]
        acc = _ZERO
        for k0 in range(0, K, tile):
            ka = k0 + tx
            if row < M and ka < K:
                a_tile[ty, tx] = a[ka, row] if trans_a else a[row, ka]
            else:
                a_tile[ty, tx] = 0
            kb = k0 + ty
            if col < N and kb < K:
                b_tile[ty, tx] = b[col, kb] if trans_b else b[kb, col]
            else:
                b_tile[ty, tx] = 0
            cuda.syncthreads()
            for kk in range(tile):
                acc += a_tile[ty, kk] * b_tile[kk, tx]
            cuda.syncthreads()
        if row < M and col < N:
            if accumulate:
                c[row, col] += acc
            else:
                c[row, col] = acc  # c is never read: poisoned (NaN) outputs are fine

    return gemm


def use_cublas():
    """True where matrix products go to cuBLAS (cupy.matmul), per ``config.GEMM``."""
    mode = config.GEMM
    if mode not in ("auto", "cublas", "numba"):
        raise ValueError(f"config.GEMM must be 'auto', 'cublas' or 'numba', got {mode!r}")
    if mode == "cublas" and _device.SIMULATOR:
        raise ValueError("config.GEMM='cublas' needs a real GPU (CuPy cannot run under the simulator)")
    return mode == "cublas" or (mode == "auto" and not _device.SIMULATOR)


def matmul(a, b, c, trans_a=False, trans_b=False, accumulate=False):
    """c = op(a) @ op(b), or c += op(a) @ op(b) if ``accumulate``; op(m) = m.T where asked.

    a [M,K] (or [K,M]), b [K,N] (or [N,K]), c [M,N]: 2-D C-contiguous device arrays of one dtype.
    """
    M, N = c.shape
    if M == 0 or N == 0:
        return
    if use_cublas():
        if accumulate:  # c = op(a) @ op(b) + 1 * c in one cuBLAS call, no temporary
            from cupy import cublas
            cublas.gemm("T" if trans_a else "N", "T" if trans_b else "N", a, b, out=c,
                        alpha=1.0, beta=1.0)
        else:
            _device.cupy.matmul(a.T if trans_a else a, b.T if trans_b else b, out=c)
        return
    tile = config.GEMM_TILE
    grid = ((N + tile - 1) // tile, (M + tile - 1) // tile)
    _gemm_kernel(tile, c.dtype)[grid, (tile, tile), _device.stream()](
        *_device.kernel_args(a, b, c), bool(trans_a), bool(trans_b), bool(accumulate))
