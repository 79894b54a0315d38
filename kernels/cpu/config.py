"""Run-time settings of the cpu backend (plain module attributes; :func:`reset` restores them).

``BLAS``
    Which BLAS library runs the kernels' GEMMs (``_blas.py``): ``"openblas"`` (the OpenBLAS
    bundled with NumPy, always there), ``"mkl"`` (Intel MKL, the optional extra
    ``bptt[mkl]``: its packed GEMM API for the per-step products), ``"auto"``: MKL where it is
    installed and the CPU is Intel's, else OpenBLAS (it says which it picked, on stderr).
    ``None`` (default): the environment variable ``BPTT_BLAS``, or ``auto`` where that is unset.
    Read at the start of each layer call that begins while no other is running, so a change
    takes effect at the next call; a bad value or an unusable ``mkl`` fails there in one line.

Example::

    from bptt_kernels.cpu import config
    config.BLAS = "openblas"
    ...
    config.reset()
"""

_DEFAULTS = {"BLAS": None}

BLAS = _DEFAULTS["BLAS"]


def reset():
    """Restore every setting to its default."""
    globals().update(_DEFAULTS)
