"""Run-time settings of the CuPy backend (plain module attributes; :func:`reset` restores them).

``PATH``
    Which recurrent implementation runs: ``"auto"`` (default) picks by size, ``"persistent"``
    forces the one-launch kernel whose blocks own batch rows (a ValueError where W_hh does not
    fit in one block's shared memory), ``"cooperative"`` the one-launch kernel whose blocks own
    hidden units and meet at a grid barrier each step (a ValueError where W_hh does not fit in
    the shared memory of all SMs together), ``"general"`` the per-step cuBLAS GEMM + fused
    gate kernel path.
``PERSISTENT_MAX_BATCH``
    ``"auto"`` uses the persistent kernel only for batches up to this size (and only where
    W_hh and the per-block state fit in the device's opt-in shared memory per block): one
    block per batch row reuses W_hh for one row only, so for large B cuBLAS wins.
``COOPERATIVE_MAX_STATE``, ``COOPERATIVE_MIN_BATCH``
    Where the persistent kernel is not used, ``"auto"`` uses the cooperative kernel where it
    fits, B * H is at most COOPERATIVE_MAX_STATE and B at least COOPERATIVE_MIN_BATCH; the
    general path (its loops replayed as CUDA graphs) otherwise. Every block of the cooperative
    kernel reads the whole [B, H] state (or one gate's gradients) through L2 each step, so its
    cost grows with B * H (the H100 figures behind the defaults: docs/performance.md).
``COOPERATIVE_UNITS``
    Hidden units per block of the cooperative kernel; ``None`` (default): the fewest that need
    no more blocks than the device has SMs. A larger number means fewer blocks, each doing
    more work per step, and less traffic through L2 (every block reads every row's h each
    step). Never fewer than the default: all blocks must be resident at once (so the GPU's SMs
    must not be held by another process's kernels that never finish, as under MPS with a
    persistent kernel of its own).
``GRAPHS``
    Run the general path's time loops as CUDA graphs (:mod:`._graphs`): each loop's 2 T
    launches are recorded once per (cell, T, B, H, t_start, dtype), the second time that key
    comes, and replayed with one call, its arrays copied in and out. ``False``: launch every
    step from Python.
``GRAPH_MAX_STATE``
    Graphs only for B * H up to this: above it a step's GPU work outlasts its launches from
    Python anyway, and the copies in and out cost time and memory for nothing
    (docs/performance.md).
``GRAPH_MEMORY``
    Bytes of device memory the recorded graphs' own arrays may hold in all (least recently
    used dropped first); a loop whose arrays need more than a quarter of it runs without a
    graph (so a training step's loops never evict each other at every call).
``POISON_OUTPUTS``
    Fill every freshly allocated output and cache array with NaN before the kernels write it,
    so an element a kernel forgets to write fails a parity check (tests; costs a fill).

Example::

    from bptt_kernels.cupy import config
    config.PATH = "general"
    ...
    config.reset()
"""

PATHS = ("auto", "persistent", "cooperative", "general")

_DEFAULTS = {"PATH": "auto", "PERSISTENT_MAX_BATCH": 64, "COOPERATIVE_MAX_STATE": 2048,
             "COOPERATIVE_MIN_BATCH": 2, "COOPERATIVE_UNITS": None, "GRAPHS": True,
             "GRAPH_MAX_STATE": 256 * 512, "GRAPH_MEMORY": 2 << 30, "POISON_OUTPUTS": False}

PATH = _DEFAULTS["PATH"]
PERSISTENT_MAX_BATCH = _DEFAULTS["PERSISTENT_MAX_BATCH"]
COOPERATIVE_MAX_STATE = _DEFAULTS["COOPERATIVE_MAX_STATE"]
COOPERATIVE_MIN_BATCH = _DEFAULTS["COOPERATIVE_MIN_BATCH"]
COOPERATIVE_UNITS = _DEFAULTS["COOPERATIVE_UNITS"]
GRAPHS = _DEFAULTS["GRAPHS"]
GRAPH_MAX_STATE = _DEFAULTS["GRAPH_MAX_STATE"]
GRAPH_MEMORY = _DEFAULTS["GRAPH_MEMORY"]
POISON_OUTPUTS = _DEFAULTS["POISON_OUTPUTS"]


def reset():
    """Restore every setting to its default."""
    globals().update(_DEFAULTS)
