"""Row-wise products whose rows round alike however many rows share the call.

OpenBLAS (NumPy's BLAS, and the cpu backend's) runs a GEMM of at most SMALL_GEMM_MNK = M*N*K
multiply-adds through "small matrix" kernels that sum each element in another order than its
regular kernels: one row of x W^T can then differ in the last bit between a call over many rows
and one over a few. The products below pad such a small call with zero rows past that size, so
that every row goes through the regular kernels; the rows of a window then come out the same
whether the window is computed whole or leaf by leaf (``bptt.memory``).
"""

import importlib

SMALL_GEMM_MNK = 1_000_000


def padded_rows(m, n, k):
    """Rows to pad an [m, k] @ [k, n] product to (m itself where it runs the regular kernels)."""
    if m * n * k > SMALL_GEMM_MNK or m == 0 or n == 0:
        return m
    return SMALL_GEMM_MNK // (n * max(k, 1)) + 1


def rows_matmul(a, b):
    """a [M,K] @ b [K,N] (b may be a transposed view; numpy or cupy arrays), each row rounded as
    in a product of many rows."""
    m, k = a.shape
    rows = padded_rows(m, b.shape[1], k)
    if rows == m:
        return a @ b
    xp = importlib.import_module(type(a).__module__.split(".")[0])   # numpy or cupy
    padded = xp.zeros((rows, k), a.dtype)
    padded[:m] = a
    return (padded @ b)[:m]
