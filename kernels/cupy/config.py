"""Run-time settings of the CuPy backend (plain module attributes; :func:`reset` restores them).

``PATH``
    Which recurrent implementation runs: ``"auto"`` (default) picks by size, ``"persistent"``
    forces the one-launch kernel (a ValueError where W_hh does not fit in shared memory),
    ``"general"`` forces the per-step cuBLAS GEMM + fused gate kernel path.
``PERSISTENT_MAX_BATCH``
    ``"auto"`` uses the persistent kernel only for batches up to this size (and only where
    W_hh and the per-block state fit in the device's opt-in shared memory per block): one
    block per batch row reuses W_hh for one row only, so for large B cuBLAS wins.
``POISON_OUTPUTS``
    Fill every freshly allocated output and cache array with NaN before the kernels write it,
    so an element a kernel forgets to write fails a parity check (tests; costs a fill).

Example::

    from bptt_kernels.cupy import config
    config.PATH = "general"
    ...
    config.reset()
"""

PATHS = ("auto", "persistent", "general")

_DEFAULTS = {"PATH": "auto", "PERSISTENT_MAX_BATCH": 64, "POISON_OUTPUTS": False}

PATH = _DEFAULTS["PATH"]
PERSISTENT_MAX_BATCH = _DEFAULTS["PERSISTENT_MAX_BATCH"]
POISON_OUTPUTS = _DEFAULTS["POISON_OUTPUTS"]


def reset():
    """Restore every setting to its default."""
    globals().update(_DEFAULTS)
