"""Tunables of the Numba-CUDA backend (STUMPY-style module globals; :func:`reset` restores them).

Change them at run time, e.g. to force a path in a test::

    from bptt_kernels.cuda import config
    config.PATH = "general"
    ...
    config.reset()

PATH
    Which recurrent implementation runs:
    ``"persistent"`` -- one launch runs all T steps in a single thread block, with W_hh held in
    shared memory across steps (small B and H only; see :func:`bptt_kernels.cuda.persistent_limits`);
    ``"general"`` -- Haste's design: input projection for all steps as one GEMM, then per step a
    GEMM ``h @ W_hh^T`` plus one fused gate kernel; weight gradients as big GEMMs after the loop;
    ``"auto"`` (default) -- persistent where it fits and ``B*H <= PERSISTENT_MAX_PAIRS``, else general.
    Forcing ``"persistent"`` where it does not fit raises ValueError.
GEMM
    The input projection and the per-step matrix products: ``"cublas"`` (``cupy.matmul``,
    cuBLAS), ``"numba"`` (this package's tiled shared-memory GEMM kernel), ``"auto"``
    (default): cublas on a real GPU, numba under the simulator. (The GEMMs after the backward
    loop run on ``xp``, in :func:`bptt_kernels.host.finish_backward`, whatever this says.)
THREADS
    Threads per block of the elementwise / gate / optimizer kernels (grid-stride loops, so any
    value is correct). Small under the simulator, where every thread is a Python thread.
GEMM_TILE
    Square tile edge of the Numba GEMM kernel (TILE*TILE threads per block).
PERSISTENT_THREADS
    Upper bound on the threads of the persistent kernels' single block (the device's
    per-kernel limit, which depends on registers, is also respected on a real GPU).
PERSISTENT_MAX_PAIRS
    ``auto`` uses the persistent path only while ``B*H`` is at most this (beyond it one block
    does too much work per step and the general path's many blocks win; the H100 figures
    behind the default: docs/performance.md).
POISON_OUTPUTS
    Fill every uninitialised array the backend allocates (outputs, caches, scratch) with NaN
    before the kernels write it, so an element a kernel forgets shows up in a parity check
    (tests; costs a fill). Same name and meaning as in the cupy backend.
PERSISTENT_SMEM_BYTES
    Shared memory one block may use; None = ask the device (its opt-in maximum, 227 KiB on
    H100) on a real GPU, 48 KiB (the no-opt-in limit) under the simulator.
"""

from numba.cuda import config as _numba_config

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

_DEFAULTS = {
    "PATH": "auto",
    "GEMM": "auto",
    "THREADS": 32 if SIMULATOR else 256,
    "GEMM_TILE": 4 if SIMULATOR else 16,
    "PERSISTENT_THREADS": 32 if SIMULATOR else 1024,
    "PERSISTENT_MAX_PAIRS": 2048,
    "PERSISTENT_SMEM_BYTES": None,
    "POISON_OUTPUTS": False,
}

PATH = _DEFAULTS["PATH"]
GEMM = _DEFAULTS["GEMM"]
THREADS = _DEFAULTS["THREADS"]
GEMM_TILE = _DEFAULTS["GEMM_TILE"]
PERSISTENT_THREADS = _DEFAULTS["PERSISTENT_THREADS"]
PERSISTENT_MAX_PAIRS = _DEFAULTS["PERSISTENT_MAX_PAIRS"]
PERSISTENT_SMEM_BYTES = _DEFAULTS["PERSISTENT_SMEM_BYTES"]
POISON_OUTPUTS = _DEFAULTS["POISON_OUTPUTS"]


def reset():
    """Restore every tunable to its default."""
    globals().update(_DEFAULTS)
